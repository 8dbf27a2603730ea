package main

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	ipamv1 "ipam/clients/cni/gen/ipamv1"
)

// tokenChecker answers GetVpcCIDRs only to the expected bearer token.
type tokenChecker struct {
	ipamv1.UnimplementedAllocatorServer
	token string
}

func (c tokenChecker) GetVpcCIDRs(ctx context.Context, req *ipamv1.GetVpcCIDRsRequest) (*ipamv1.GetVpcCIDRsResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer "+c.token {
		return nil, status.Error(codes.Unauthenticated, "bad token")
	}
	return &ipamv1.GetVpcCIDRsResponse{Cidrs: []string{"10.0.0.0/16"}}, nil
}

func TestDialsAUnixSocketAndSendsTheToken(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "allocator.sock")
	listener, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	ipamv1.RegisterAllocatorServer(server, tokenChecker{token: "tok-1"})
	go func() { _ = server.Serve(listener) }()
	defer server.Stop()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for token, want := range map[string]codes.Code{"tok-1": codes.OK, "wrong": codes.Unauthenticated} {
		conn, client, err := Dial(&Settings{Allocator: "unix://" + socket, Token: token})
		if err != nil {
			t.Fatal(err)
		}
		_, err = client.GetVpcCIDRs(ctx, &ipamv1.GetVpcCIDRsRequest{Node: "n1"})
		if status.Code(err) != want {
			t.Errorf("token %q: %v, want %s", token, err, want)
		}
		if token == "wrong" && CNIError("add", err).Code != ErrCredentials {
			t.Errorf("a refused token is not reported as a credentials error")
		}
		_ = conn.Close()
	}
}
