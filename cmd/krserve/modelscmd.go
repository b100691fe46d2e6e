package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/krserve/krserve/models"
)

// client flags shared by ps, load and unload.
type clientFlags struct {
	url, apiKey string
	asJSON      bool
}

func (c *clientFlags) bind(cmd *cobra.Command) {
	cmd.Flags().StringVar(&c.url, "url", "http://127.0.0.1:8080", "server base URL")
	cmd.Flags().StringVar(&c.apiKey, "api-key", "", "bearer token, if the server needs one (default $KRSERVE_API_KEY)")
	cmd.Flags().BoolVar(&c.asJSON, "json", false, "print the server's JSON answer")
}

// call sends one request to a running server and returns the body of a 200.
func (c *clientFlags) call(cmd *cobra.Command, method, path string, timeout time.Duration) ([]byte, error) {
	key := c.apiKey
	if key == "" {
		key = os.Getenv("KRSERVE_API_KEY")
	}
	url := strings.TrimRight(c.url, "/") + path
	req, err := http.NewRequestWithContext(cmd.Context(), method, url, nil)
	if err != nil {
		return nil, err
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := (&http.Client{Timeout: timeout}).Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w (is `krserve up` running?)", method, url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != 200 {
		var e struct {
			Error struct{ Message string } `json:"error"`
		}
		if json.Unmarshal(body, &e) == nil && e.Error.Message != "" {
			return nil, fmt.Errorf("%s: %s", resp.Status, e.Error.Message)
		}
		return nil, fmt.Errorf("%s %s answered %s: %s", method, url, resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
}

func newPsCmd() *cobra.Command {
	var c clientFlags
	cmd := &cobra.Command{
		Use:   "ps",
		Short: "List a running server's models: state, memory, requests, expiry (GET /api/ps?all=1)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			body, err := c.call(cmd, "GET", "/api/ps?all=1", 10*time.Second)
			if err != nil {
				return err
			}
			if c.asJSON {
				_, err := os.Stdout.Write(body)
				return err
			}
			var doc struct {
				Models []models.Status `json:"models"`
			}
			if err := json.Unmarshal(body, &doc); err != nil {
				return fmt.Errorf("reading /api/ps: %w", err)
			}
			return printPs(os.Stdout, doc.Models, time.Now())
		},
	}
	c.bind(cmd)
	return cmd
}

func printPs(w io.Writer, ms []models.Status, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tWORKERS\tMEMORY\tIN FLIGHT\tQUEUED\tUNTIL\tLOAD\tPATH")
	for _, m := range ms {
		mem := "~" + models.FormatBytes(m.Estimated)
		if m.Measured > 0 {
			mem = models.FormatBytes(m.Measured)
		}
		until := "-"
		switch {
		case m.State == models.StateFailed:
			until = "retry in " + m.RetryAt.Sub(now).Round(time.Second).String()
		case !m.ExpiresAt.IsZero():
			until = m.ExpiresAt.Sub(now).Round(time.Second).String()
		case m.State == models.StateReady && m.InFlight == 0:
			until = "forever"
		}
		load := "-"
		if m.LoadSeconds > 0 {
			load = fmt.Sprintf("%.1fs", m.LoadSeconds)
		}
		state := m.State
		if m.Pinned {
			state += " (pinned)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%d\t%s\t%s\t%s\n", m.Name, state, m.Workers, mem, m.InFlight, m.Queued, until, load, m.Path)
		if m.Reason != "" {
			fmt.Fprintf(tw, "  failed: %s\t\t\t\t\t\t\t\t\n", m.Reason)
		}
	}
	return tw.Flush()
}

func newLoadCmd(unload bool) *cobra.Command {
	var c clientFlags
	var timeout time.Duration
	verb, short := "load", "Load a model on a running server and wait until it is ready (POST /api/models/NAME/load)"
	if unload {
		verb, short = "unload", "Unload a model on a running server: it finishes its requests, then stops (POST /api/models/NAME/unload)"
	}
	cmd := &cobra.Command{
		Use:   verb + " NAME",
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			body, err := c.call(cmd, "POST", "/api/models/"+args[0]+"/"+verb, timeout)
			if err != nil {
				return err
			}
			if c.asJSON {
				_, err := os.Stdout.Write(body)
				return err
			}
			var st models.Status
			if err := json.Unmarshal(body, &st); err != nil {
				return err
			}
			return printPs(os.Stdout, []models.Status{st}, time.Now())
		},
	}
	c.bind(cmd)
	cmd.Flags().DurationVar(&timeout, "timeout", 10*time.Minute, "give up waiting after this long")
	return cmd
}

func newModelsCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "models",
		Short: "List the mlx-lm models on this machine: the krserve cache, the Hugging Face cache and LM Studio's models folder",
		Long: "List the mlx-lm model directories (config.json and safetensors weights) in the krserve cache\n" +
			"($KRSERVE_CACHE_DIR/models, ~/.cache/krserve/models), the Hugging Face cache ($HF_HUB_CACHE,\n" +
			"$HF_HOME/hub, ~/.cache/huggingface/hub) and LM Studio's models folder (~/.lmstudio/models).\n" +
			"A Hugging Face repo id listed here can be given to --model without going online.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			found := models.Discover(models.DefaultPlaces())
			if asJSON {
				return json.NewEncoder(os.Stdout).Encode(found)
			}
			if len(found) == 0 {
				fmt.Println("no mlx-lm model found (krserve cache, Hugging Face cache, LM Studio)")
				return nil
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSOURCE\tWEIGHTS\tPATH")
			for _, f := range found {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", f.Name, f.Source, models.FormatBytes(f.Bytes), f.Path)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
