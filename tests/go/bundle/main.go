// Command bundle reads a SPIFFE bundle document with go-spiffe's spiffebundle parser and
// prints what it understood as JSON, so the Python tests can compare (tests/test_bundle_interop.py).
//
// Usage: bundle TRUST_DOMAIN FILE
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

type result struct {
	TrustDomain   string   `json:"trust_domain"`
	Sequence      uint64   `json:"sequence"`
	RefreshHint   float64  `json:"refresh_hint_seconds"`
	X509SHA256    []string `json:"x509_authorities_sha256"`
	JWTAuthorities int     `json:"jwt_authorities"`
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: bundle TRUST_DOMAIN FILE")
		os.Exit(2)
	}
	td, err := spiffeid.TrustDomainFromString(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(2)
	}
	data, err := os.ReadFile(os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(2)
	}
	b, err := spiffebundle.Parse(td, data)
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
	out := result{TrustDomain: b.TrustDomain().String(), X509SHA256: []string{}}
	if seq, ok := b.SequenceNumber(); ok {
		out.Sequence = seq
	}
	if hint, ok := b.RefreshHint(); ok {
		out.RefreshHint = hint.Seconds()
	}
	for _, cert := range b.X509Authorities() {
		sum := sha256.Sum256(cert.Raw)
		out.X509SHA256 = append(out.X509SHA256, hex.EncodeToString(sum[:]))
	}
	out.JWTAuthorities = len(b.JWTAuthorities())
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(2)
	}
}
