package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	ipamv1 "ipam/clients/cni/gen/ipamv1"
)

// bearer sends the client token with every call.
type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (b bearer) RequireTransportSecurity() bool { return b.secure }

// Target is the gRPC target of an allocator address: unix:// sockets as they are, host:port
// without name resolution of its own (one process, one call: no resolver to start).
func Target(address string) string {
	if strings.HasPrefix(address, "unix:") || strings.Contains(address, ":///") {
		return address
	}
	return "passthrough:///" + address
}

func transportCredentials(c *TLSConfig) (credentials.TransportCredentials, error) {
	if c == nil {
		return insecure.NewCredentials(), nil
	}
	cfg := &tls.Config{ServerName: c.ServerName, MinVersion: tls.VersionTLS12}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("ipam.tls.caFile: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ipam.tls.caFile %s holds no PEM certificate", c.CAFile)
		}
		cfg.RootCAs = pool
	}
	if c.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("ipam.tls certFile/keyFile: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return credentials.NewTLS(cfg), nil
}

// Dial connects (lazily) to the allocator the settings name.
func Dial(s *Settings) (*grpc.ClientConn, ipamv1.AllocatorClient, error) {
	creds, err := transportCredentials(s.TLS)
	if err != nil {
		return nil, nil, err
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if s.Token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer{token: s.Token, secure: s.TLS != nil}))
	}
	conn, err := grpc.NewClient(Target(s.Allocator), opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("allocator address %q: %w", s.Allocator, err)
	}
	return conn, ipamv1.NewAllocatorClient(conn), nil
}
