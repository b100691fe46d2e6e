// Command krserve serves MLX language models from a supervised pool of
// Python mlx-lm workers behind an OpenAI-compatible HTTP API.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

func main() {
	root := &cobra.Command{
		Use:           "krserve",
		Short:         "Serve MLX language models from supervised, crash-isolated mlx-lm workers",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newUpCmd(), newStatusCmd(), newPsCmd(), newLoadCmd(false), newLoadCmd(true), newModelsCmd(), newBenchCmd(), newVersionCmd())
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "krserve:", err)
		os.Exit(1)
	}
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Run: func(cmd *cobra.Command, args []string) {
			fmt.Println("krserve", version)
		},
	}
}
