// composecheck validates Compose files the way Docker Compose loads them, with compose-go (the
// Compose specification's reference library): the JSON schema, interpolation, normalization and
// the consistency checks (depends_on, networks, volumes naming things that exist).
//
// Usage: composecheck FILE...   (exit status 1 when any file is invalid)
//
// Files are loaded with an empty environment, so every ${VAR:-default} must be valid on its own.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
)

func check(file string) (string, error) {
	absolute, err := filepath.Abs(file)
	if err != nil {
		return "", err
	}
	options, err := cli.NewProjectOptions([]string{absolute},
		cli.WithWorkingDirectory(filepath.Dir(absolute)),
		cli.WithEnv(nil),
		cli.WithInterpolation(true),
		cli.WithNormalization(true),
		cli.WithConsistency(true),
	)
	if err != nil {
		return "", err
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		return "", err
	}
	return strings.Join(project.ServiceNames(), ", "), nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: composecheck FILE...")
		os.Exit(2)
	}
	failed := false
	for _, file := range os.Args[1:] {
		services, err := check(file)
		if err != nil {
			fmt.Printf("%s: INVALID: %v\n", file, err)
			failed = true
			continue
		}
		fmt.Printf("%s: valid (services: %s)\n", file, services)
	}
	if failed {
		os.Exit(1)
	}
}
