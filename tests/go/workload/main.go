// Command workload asks a SPIFFE Workload API for its X.509 context and its X.509 bundles with
// go-spiffe's workloadapi client and prints, as JSON, the SVID's ID and every trust domain's
// authorities (SHA-256 of each DER), so the Python tests can compare
// (tests/test_federation_agent.py: federated bundles reach go-spiffe).
//
// Usage: workload unix:///path/to/socket
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

type result struct {
	SpiffeID string              `json:"spiffe_id"`
	Context  map[string][]string `json:"context_bundles"`
	Bundles  map[string][]string `json:"bundles"`
}

func digests(set *x509bundle.Set) map[string][]string {
	out := map[string][]string{}
	for _, b := range set.Bundles() {
		sums := []string{}
		for _, cert := range b.X509Authorities() {
			sum := sha256.Sum256(cert.Raw)
			sums = append(sums, hex.EncodeToString(sum[:]))
		}
		out[b.TrustDomain().String()] = sums
	}
	return out
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: workload unix:///path/to/socket")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	addr := workloadapi.WithAddr(os.Args[1])
	x509ctx, err := workloadapi.FetchX509Context(ctx, addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
	bundles, err := workloadapi.FetchX509Bundles(ctx, addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
	out := result{
		SpiffeID: x509ctx.DefaultSVID().ID.String(),
		Context:  digests(x509ctx.Bundles),
		Bundles:  digests(bundles),
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(2)
	}
}
