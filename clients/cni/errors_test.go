package main

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func allocatorError(t *testing.T, code codes.Code, reason string) error {
	t.Helper()
	st, err := status.New(code, "pool default of node n1 has no free IPv4 address").WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: "ipam"})
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

func TestErrorMapping(t *testing.T) {
	cases := []struct {
		code   codes.Code
		reason string
		want   uint
	}{
		{codes.ResourceExhausted, "POOL_EMPTY", types.ErrTryAgainLater},
		{codes.ResourceExhausted, "POOL_COOLING_DOWN", types.ErrTryAgainLater},
		{codes.ResourceExhausted, "NODE_AT_CAPACITY", ErrPoolCannotGrow},
		{codes.ResourceExhausted, "SUBNET_FULL", ErrPoolCannotGrow},
		{codes.Unavailable, "STORE_UNAVAILABLE", types.ErrTryAgainLater},
		{codes.Unavailable, "", types.ErrTryAgainLater},
		{codes.DeadlineExceeded, "", types.ErrTryAgainLater},
		{codes.NotFound, "NODE_NOT_FOUND", types.ErrInvalidNetworkConfig},
		{codes.InvalidArgument, "INVALID_NAME", types.ErrInvalidNetworkConfig},
		{codes.FailedPrecondition, "IPV6_DISABLED", types.ErrInvalidNetworkConfig},
		{codes.Unauthenticated, "INVALID_CREDENTIALS", ErrCredentials},
		{codes.PermissionDenied, "ADMIN_ROLE_REQUIRED", ErrCredentials},
		{codes.Internal, "", types.ErrInternal},
	}
	for _, c := range cases {
		got := CNIError("add", allocatorError(t, c.code, c.reason))
		if got.Code != c.want {
			t.Errorf("%s %s: code %d, want %d", c.code, c.reason, got.Code, c.want)
		}
		if !strings.HasPrefix(got.Msg, "add: allocator said "+c.code.String()) || (c.reason != "" && !strings.Contains(got.Msg, c.reason)) {
			t.Errorf("%s %s: message %q lacks the code or reason", c.code, c.reason, got.Msg)
		}
		if got.Details != "pool default of node n1 has no free IPv4 address" {
			t.Errorf("%s: details %q", c.code, got.Details)
		}
	}
}

func TestRefillingPoolSaysTryAgainLater(t *testing.T) {
	got := CNIError("add", allocatorError(t, codes.ResourceExhausted, "POOL_EMPTY"))
	if !strings.Contains(got.Msg, "try again later") {
		t.Errorf("message %q", got.Msg)
	}
}

func TestNonStatusErrors(t *testing.T) {
	if got := CNIError("add", fmt.Errorf("x: %w", context.DeadlineExceeded)); got.Code != types.ErrTryAgainLater {
		t.Errorf("deadline: %d", got.Code)
	}
	if got := CNIError("add", fmt.Errorf("boom")); got.Code != types.ErrInternal {
		t.Errorf("other: %d", got.Code)
	}
	passed := types.NewError(types.ErrDecodingFailure, "bad", "")
	if got := CNIError("add", passed); got != passed {
		t.Errorf("a CNI error is passed through")
	}
}

func TestStatusErrorIsPluginNotAvailable(t *testing.T) {
	for _, code := range []codes.Code{codes.Unavailable, codes.Unauthenticated, codes.NotFound} {
		if got := StatusError(allocatorError(t, code, "")); got.Code != types.ErrPluginNotAvailable {
			t.Errorf("%s: %d", code, got.Code)
		}
	}
}

func TestIsNotFound(t *testing.T) {
	if !IsNotFound(allocatorError(t, codes.NotFound, "POOL_NOT_FOUND")) || IsNotFound(allocatorError(t, codes.Unavailable, "")) {
		t.Error("IsNotFound")
	}
}
