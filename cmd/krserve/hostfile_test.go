package main

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/krserve/krserve/supervisor"
)

func TestParseHostFile(t *testing.T) {
	two := []supervisor.Host{{SSH: "mac1", IPs: []string{"10.0.0.1"}}, {SSH: "mac2", IPs: []string{"10.0.0.2", "192.168.7.2"}}}
	for _, tc := range []struct {
		name, in string
		hosts    []supervisor.Host
		envs     []string
		err      string // what the error must say, with its file:line:col
	}{
		{name: "mlx's list", in: `[{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2", "192.168.7.2"]}]`, hosts: two},
		{name: "mlx's object, rdma ignored", in: `{"backend": "ring", "envs": ["MLX_METAL_FAST_SYNCH=1", "A="],
  "hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"], "rdma": [null, "rdma_en2"]},
            {"ssh": "mac2", "ips": ["10.0.0.2", "192.168.7.2"], "rdma": ["rdma_en2", null]}]}`,
			hosts: two, envs: []string{"MLX_METAL_FAST_SYNCH=1", "A="}},
		{name: "this machine and IPv6", in: `[{"ssh": "127.0.0.1", "ips": ["fe80::1"]}, {"ssh": "user@mac2", "ips": ["::ffff:10.0.0.2"]}]`,
			hosts: []supervisor.Host{{SSH: "127.0.0.1", IPs: []string{"fe80::1"}}, {SSH: "user@mac2", IPs: []string{"::ffff:10.0.0.2"}}}},
		{name: "syntax error", in: "[\n  {\"ssh\": \"mac1\", \"ips\": [\"10.0.0.1\"]},\n  {\"ssh\": \"mac2\" \"ips\": []}\n]", err: ":3:18: invalid JSON: invalid character '\"' after object key:value pair"},
		{name: "truncated", in: "[\n {\"ssh\": \"mac1\", \"ips\": [\"10.0.0.1\"]},\n", err: ":3:1: invalid JSON: unexpected end of JSON input"},
		{name: "trailing text", in: `[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}] x`, err: ":1:72: invalid JSON: invalid character 'x' after top-level value"},
		{name: "empty list", in: `[]`, err: ":1:1: lists no hosts"},
		{name: "empty hosts", in: `{"hosts": []}`, err: ":1:1: lists no hosts"},
		{name: "one host", in: `[{"ssh": "mac1", "ips": ["10.0.0.1"]}]`, err: "lists one host: a group of ranks needs at least two"},
		{name: "no hosts key", in: `{"backend": "ring"}`, err: `:1:1: no "hosts" list`},
		{name: "not a list", in: `"mac1,mac2"`, err: ":1:1: want a JSON list of hosts"},
		{name: "missing ssh", in: "[{\"ssh\": \"a\", \"ips\": [\"10.0.0.1\"]},\n {\"ips\": [\"10.0.0.2\"]}]", err: `:2:2: host 1 has no "ssh"`},
		{name: "empty ssh", in: `[{"ssh": "", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]`, err: `:1:2: host 0 has no "ssh"`},
		{name: "option as host", in: `[{"ssh": "-oProxyCommand=x", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]`, err: `"ssh" "-oProxyCommand=x" is not a host name`},
		{name: "missing ips", in: `[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "mac2"}]`, err: `:1:37: host 1 (mac2) has no "ips"`},
		{name: "empty ips", in: `[{"ssh": "a", "ips": []}, {"ssh": "b", "ips": ["10.0.0.2"]}]`, err: `host 0 (a) has no "ips"`},
		{name: "hostname in ips", in: `[{"ssh": "a", "ips": ["mac1.local"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]`, err: `"mac1.local" in "ips" is not an IP address`},
		{name: "ips not a list", in: `[{"ssh": "a", "ips": "10.0.0.1"}, {"ssh": "b", "ips": ["10.0.0.2"]}]`, err: `:1:2: host 0: ips is a JSON string, want a list of strings`},
		{name: "ssh not a string", in: `[{"ssh": 7, "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]`, err: `:1:2: host 0: ssh is a JSON number, want string`},
		{name: "unknown host key", in: `[{"ssh": "a", "ip": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]`, err: `:1:2: host 0: unknown field "ip" (a host has "ssh", "ips" and "rdma")`},
		{name: "unknown top key", in: "{\"hosts\": [],\n \"backends\": \"ring\"}", err: `:2:2: unknown key "backends"`},
		{name: "jaccl", in: `{"backend": "jaccl", "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]}`, err: `backend "jaccl": krserve's ranks use the ring backend`},
		{name: "bad env", in: `{"envs": ["NO VALUE"], "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]}`, err: `:1:2: envs[0] "NO VALUE": want KEY=VALUE`},
	} {
		hf, err := parseHostFile("hosts.json", []byte(tc.in))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) || !strings.HasPrefix(err.Error(), "--hostfile hosts.json:") {
				t.Errorf("%s: error %v; want one with %q", tc.name, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if !slices.EqualFunc(hf.Hosts, tc.hosts, func(a, b supervisor.Host) bool { return a.SSH == b.SSH && slices.Equal(a.IPs, b.IPs) }) || !slices.Equal(hf.Envs, tc.envs) {
			t.Errorf("%s: hosts %+v envs %q; want %+v %q", tc.name, hf.Hosts, hf.Envs, tc.hosts, tc.envs)
		}
	}
}

func TestLoadHostFileMissing(t *testing.T) {
	_, err := loadHostFile(filepath.Join(t.TempDir(), "nope.json"))
	if err == nil || !strings.Contains(err.Error(), "--hostfile") || !os.IsNotExist(unwrapAll(err)) {
		t.Fatalf("missing file: %v", err)
	}
}

func unwrapAll(err error) error {
	for {
		type unwrapper interface{ Unwrap() error }
		u, ok := err.(unwrapper)
		if !ok {
			return err
		}
		err = u.Unwrap()
	}
}

func TestSSHCommand(t *testing.T) {
	for in, want := range map[string][]string{
		"ssh": {"ssh"},
		`ssh -i "/keys/my key" -o ConnectTimeout=5`: {"ssh", "-i", "/keys/my key", "-o", "ConnectTimeout=5"},
		`/opt/bin/ssh -F '/etc/x y'`:                {"/opt/bin/ssh", "-F", "/etc/x y"},
	} {
		got, err := sshCommand(in)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("sshCommand(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "  ", `ssh -i "unterminated`} {
		if _, err := sshCommand(bad); err == nil {
			t.Errorf("sshCommand(%q) accepted", bad)
		}
	}
}

func TestSSHEnvDropsSecrets(t *testing.T) {
	got := sshEnv([]string{"HOME=/h", "SSH_AUTH_SOCK=/tmp/a", "KRSERVE_API_KEY=k", "AWS_SECRET_ACCESS_KEY=s", "GH_TOKEN=t", "DB_PASSWORD=p", "PATH=/bin"})
	if !slices.Equal(got, []string{"HOME=/h", "SSH_AUTH_SOCK=/tmp/a", "PATH=/bin"}) {
		t.Errorf("sshEnv = %q", got)
	}
}

func TestGroupHosts(t *testing.T) {
	hf := &hostFile{Hosts: []supervisor.Host{{SSH: "127.0.0.1", IPs: []string{"10.0.0.1"}}, {SSH: "mac2", IPs: []string{"10.0.0.2", "10.1.0.2"}}}, Envs: []string{"A=1"}}
	c := upConfig{SSH: "ssh -p 2222", RingPort: 32323, Heartbeat: time.Second, HeartbeatLimit: 10 * time.Second, StopGrace: 3 * time.Second}
	hs, err := groupHosts(hf, c, "/venv/bin/python")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(hs.SSH, []string{"ssh", "-p", "2222"}) || hs.Python != "/venv/bin/python" || !slices.Equal(hs.Env, hf.Envs) ||
		hs.Keepalive != time.Second || hs.IdleExit != 10*time.Second || hs.Grace != 3*time.Second {
		t.Errorf("hosts %+v", hs)
	}
	if first, _, _ := hs.Ports.Acquire(); first != 32323 || hs.Ports.Size != 4 || hs.Ports.Count != ringBlocks {
		t.Errorf("ports from %d, %d a block, %d blocks", first, hs.Ports.Size, hs.Ports.Count)
	}
	c.Heartbeat = 5 * time.Second // the idle limit stays past three heartbeats
	if hs, _ := groupHosts(hf, c, "py"); hs.IdleExit != 15*time.Second {
		t.Errorf("idle limit %v with 5 s heartbeats; want 15s", hs.IdleExit)
	}
	c.RingPort = 65500
	if _, err := groupHosts(hf, c, "py"); err == nil || !strings.Contains(err.Error(), "--ring-port 65500") {
		t.Errorf("ports past 65535: %v", err)
	}
	c.RingPort, c.SSH = 32323, ""
	if _, err := groupHosts(hf, c, "py"); err == nil || !strings.Contains(err.Error(), "--ssh is empty") {
		t.Errorf("empty --ssh: %v", err)
	}
}
