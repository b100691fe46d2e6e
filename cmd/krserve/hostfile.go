package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"github.com/kballard/go-shellquote"

	"github.com/krserve/krserve/supervisor"
)

// hostFile is mlx's host file (mlx.launch --hostfile) as krserve reads it:
// either a JSON list of hosts or an object {"backend", "envs", "hosts"}; each
// host {"ssh": NAME, "ips": [IP, ...], "rdma": [...]}. Rank r runs on
// hosts[r]; the group size is the number of hosts.
type hostFile struct {
	Path  string
	Hosts []supervisor.Host
	Envs  []string // KEY=VALUE for every rank
}

// loadHostFile reads and checks a host file; every error names the file
// and, where it can, the line.
func loadHostFile(path string) (*hostFile, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--hostfile: %w", err)
	}
	return parseHostFile(path, b)
}

// hostEntry is one host as written: pointers tell a missing field from an
// empty one.
type hostEntry struct {
	SSH  *string         `json:"ssh"`
	IPs  []string        `json:"ips"`
	RDMA json.RawMessage `json:"rdma"` // JACCL's devices: read by mlx.launch, not by the ring backend
}

func parseHostFile(path string, data []byte) (*hostFile, error) {
	p := &hostParser{path: path, data: data, dec: json.NewDecoder(bytes.NewReader(data))}
	var whole any // syntax first: Unmarshal's offsets count from the file's start
	if err := json.Unmarshal(data, &whole); err != nil {
		return nil, p.jsonErr(err, 0, "")
	}
	p.dec.DisallowUnknownFields()
	hf := &hostFile{Path: path}
	tok, err := p.dec.Token()
	if err != nil {
		return nil, p.jsonErr(err, 0, "")
	}
	switch tok {
	case json.Delim('['):
		if hf.Hosts, err = p.hosts(); err != nil {
			return nil, err
		}
	case json.Delim('{'):
		sawHosts := false
		for p.dec.More() {
			at := p.next()
			k, err := p.dec.Token()
			if err != nil {
				return nil, p.jsonErr(err, at, "")
			}
			key, _ := k.(string)
			switch key {
			case "hosts":
				sawHosts = true
				if tok, err := p.dec.Token(); err != nil || tok != json.Delim('[') {
					return nil, p.errAt(at, `"hosts" must be a list of hosts`)
				}
				if hf.Hosts, err = p.hosts(); err != nil {
					return nil, err
				}
			case "backend":
				var backend string
				if err := p.dec.Decode(&backend); err != nil {
					return nil, p.jsonErr(err, at, `"backend"`)
				}
				if backend != "" && backend != "ring" {
					return nil, p.errAt(at, fmt.Sprintf("backend %q: krserve's ranks use the ring backend (TCP over Ethernet or Thunderbolt IP); "+
						"JACCL (RDMA over Thunderbolt 5), MPI and NCCL are not supported: leave \"backend\" out or set it to \"ring\"", backend))
				}
			case "envs":
				var envs []string
				if err := p.dec.Decode(&envs); err != nil {
					return nil, p.jsonErr(err, at, `"envs"`)
				}
				for i, e := range envs {
					k, _, ok := strings.Cut(e, "=")
					if !ok || k == "" || strings.Trim(k, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") != "" {
						return nil, p.errAt(at, fmt.Sprintf("envs[%d] %q: want KEY=VALUE, KEY of letters, digits and _", i, e))
					}
				}
				hf.Envs = envs
			default:
				return nil, p.errAt(at, fmt.Sprintf("unknown key %q (a host file has \"hosts\", \"backend\" and \"envs\")", key))
			}
		}
		if !sawHosts {
			return nil, p.errAt(0, `no "hosts" list`)
		}
		if _, err := p.dec.Token(); err != nil { // the closing brace
			return nil, p.jsonErr(err, len(data), "")
		}
	default:
		return nil, p.errAt(0, `want a JSON list of hosts, [{"ssh": "mac1", "ips": ["10.0.0.1"]}, ...], or an object with "hosts"`)
	}
	switch len(hf.Hosts) {
	case 0:
		return nil, p.errAt(0, "lists no hosts")
	case 1:
		return nil, p.errAt(0, "lists one host: a group of ranks needs at least two (one host is one process: leave out --hostfile)")
	}
	return hf, nil
}

type hostParser struct {
	path string
	data []byte
	dec  *json.Decoder
}

// hosts reads the elements of a host list whose '[' has been read, and
// its ']'.
func (p *hostParser) hosts() ([]supervisor.Host, error) {
	var out []supervisor.Host
	for i := 0; p.dec.More(); i++ {
		at := p.next()
		var e hostEntry
		if err := p.dec.Decode(&e); err != nil {
			return nil, p.jsonErr(err, at, fmt.Sprintf("host %d", i))
		}
		if e.SSH == nil || *e.SSH == "" {
			return nil, p.errAt(at, fmt.Sprintf(`host %d has no "ssh": the name to ssh to ("127.0.0.1" for this machine)`, i))
		}
		name := *e.SSH
		if strings.HasPrefix(name, "-") || strings.ContainsFunc(name, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
			return nil, p.errAt(at, fmt.Sprintf(`host %d: "ssh" %q is not a host name ssh can take`, i, name))
		}
		if len(e.IPs) == 0 {
			return nil, p.errAt(at, fmt.Sprintf(`host %d (%s) has no "ips": the ring backend needs the address other hosts reach it at`, i, name))
		}
		for _, ip := range e.IPs {
			if net.ParseIP(ip) == nil {
				return nil, p.errAt(at, fmt.Sprintf(`host %d (%s): %q in "ips" is not an IP address (the ring backend connects to addresses, as mlx.launch requires)`, i, name, ip))
			}
		}
		out = append(out, supervisor.Host{SSH: name, IPs: e.IPs})
	}
	if _, err := p.dec.Token(); err != nil { // the closing bracket
		return nil, p.jsonErr(err, len(p.data), "")
	}
	return out, nil
}

// next is the offset of the next value: past the whitespace and the comma
// or colon after the decoder's position.
func (p *hostParser) next() int {
	i := int(p.dec.InputOffset())
	for i < len(p.data) && strings.IndexByte(" \t\r\n,:", p.data[i]) >= 0 {
		i++
	}
	return i
}

// errAt is msg at the line and column of offset.
func (p *hostParser) errAt(offset int, msg string) error {
	line, col := 1, 1
	for _, c := range p.data[:min(offset, len(p.data))] {
		if c == '\n' {
			line, col = line+1, 1
		} else {
			col++
		}
	}
	return fmt.Errorf("--hostfile %s:%d:%d: %s", p.path, line, col, msg)
}

// jsonErr places a JSON error: a syntax error at its own offset, anything
// else (a value of the wrong type, an unknown field) at the value that holds
// it.
func (p *hostParser) jsonErr(err error, at int, what string) error {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	msg := strings.TrimPrefix(err.Error(), "json: ")
	switch {
	case errors.As(err, &syn):
		at = int(syn.Offset) - 1 // the offending byte
		if strings.Contains(msg, "unexpected end") {
			at = len(p.data)
		}
		msg = "invalid JSON: " + msg
	case errors.As(err, &typ):
		msg = fmt.Sprintf("%s is a JSON %s, want %s", typ.Field, typ.Value, typ.Type)
		if strings.Contains(typ.Type.String(), "[]string") {
			msg = fmt.Sprintf("%s is a JSON %s, want a list of strings", typ.Field, typ.Value)
		}
	case errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF):
		at, msg = len(p.data), "the JSON ends too early"
	case strings.HasPrefix(msg, "unknown field"):
		msg += ` (a host has "ssh", "ips" and "rdma")`
	}
	if what != "" {
		msg = what + ": " + msg
	}
	return p.errAt(max(at, 0), msg)
}

// ringBlocks is how many port blocks the groups of a host file take in
// turn (supervisor.PortBlocks).
const ringBlocks = 64

// groupHosts is where every group's ranks run, from the host file and the
// flags: ssh as --ssh says, the wrapper on each host run by the workers'
// Python, keep-alives every heartbeat, a remote rank ended after
// --heartbeat-timeout without a word (at least three heartbeats) or
// --stop-grace after its session ends.
func groupHosts(hf *hostFile, c upConfig, python string) (*supervisor.Hosts, error) {
	ssh, err := sshCommand(c.SSH)
	if err != nil {
		return nil, err
	}
	hs := &supervisor.Hosts{Hosts: hf.Hosts, SSH: ssh, SSHEnv: sshEnv(os.Environ()), Env: hf.Envs, Python: python,
		Keepalive: c.Heartbeat, IdleExit: max(c.HeartbeatLimit, 3*c.Heartbeat), Grace: c.StopGrace}
	if hs.Ports, err = supervisor.NewPortBlocks(c.RingPort, hs.PortsPerGroup(), ringBlocks); err != nil {
		return nil, fmt.Errorf("--ring-port %d: %w", c.RingPort, err)
	}
	return hs, nil
}

// sshCommand splits --ssh into the program and its options, as a shell would.
func sshCommand(s string) ([]string, error) {
	words, err := shellquote.Split(s)
	if err != nil {
		return nil, fmt.Errorf("--ssh %q: %w", s, err)
	}
	if len(words) == 0 {
		return nil, errors.New("--ssh is empty: give the ssh program and its options, e.g. \"ssh -i ~/.ssh/cluster\"")
	}
	return words, nil
}

// sshEnv is ssh's own environment: the supervisor's, less what names a key,
// token, secret or password (ssh needs HOME, USER, SSH_AUTH_SOCK and the
// like; it forwards only what its SendEnv names).
func sshEnv(environ []string) []string {
	var out []string
	for _, kv := range environ {
		k, _, _ := strings.Cut(kv, "=")
		u := strings.ToUpper(k)
		if strings.Contains(u, "KEY") || strings.Contains(u, "TOKEN") || strings.Contains(u, "SECRET") || strings.Contains(u, "PASSWORD") {
			continue
		}
		out = append(out, kv)
	}
	return out
}
