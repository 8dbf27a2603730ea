package main

import (
	"context"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	ipamv1 "ipam/clients/cni/gen/ipamv1"
)

func statusWithReason(t *testing.T, code codes.Code, reason string) error {
	t.Helper()
	st, err := status.New(code, reason).WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: "ipam"})
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

// failingAllocator answers AllocateNext and ReleaseByKey with `errs` in turn, then succeeds.
type failingAllocator struct {
	fakeAllocator
	errs  []error
	calls int
}

func (f *failingAllocator) next() error {
	f.calls++
	if f.calls <= len(f.errs) {
		return f.errs[f.calls-1]
	}
	return nil
}

func (f *failingAllocator) AllocateNext(ctx context.Context, r *ipamv1.AllocateNextRequest, o ...grpc.CallOption) (*ipamv1.AllocateNextResponse, error) {
	if err := f.next(); err != nil {
		return nil, err
	}
	return f.fakeAllocator.AllocateNext(ctx, r, o...)
}

func TestAddRetriesWhatAFailoverAnswersUnderItsKey(t *testing.T) {
	f := &failingAllocator{fakeAllocator: fakeAllocator{reply: &ipamv1.AllocateNextResponse{
		Ipv4: &ipamv1.AllocationResult{Ip: "10.0.1.17", SubnetCidr: "10.0.0.0/18", GatewayIp: "10.0.0.1"},
	}}}
	f.errs = []error{
		statusWithReason(t, codes.Unavailable, "STORE_UNAVAILABLE"),
		statusWithReason(t, codes.Aborted, "OUTCOME_UNKNOWN"),
		statusWithReason(t, codes.Aborted, "OUTCOME_UNKNOWN"),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if r, err := Add(ctx, f, &Settings{Node: "n"}, "cni:net/c1/eth0", "c1", "1.0.0"); err != nil || r == nil {
		t.Fatalf("after a failover: %v", err)
	}
	if f.calls != 4 {
		t.Errorf("%d calls, want 4", f.calls)
	}
}

func TestAddDoesNotRetryOtherFailuresNorPastItsDeadline(t *testing.T) {
	f := &failingAllocator{errs: []error{statusWithReason(t, codes.ResourceExhausted, "NODE_AT_CAPACITY")}}
	if _, err := Add(context.Background(), f, &Settings{Node: "n"}, "k", "c", "1.0.0"); err == nil || f.calls != 1 {
		t.Fatalf("%v after %d calls", err, f.calls)
	}
	unavailable := statusWithReason(t, codes.Unavailable, "STORE_UNAVAILABLE")
	f = &failingAllocator{errs: []error{unavailable, unavailable, unavailable, unavailable, unavailable, unavailable}}
	ctx, cancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
	defer cancel()
	started := time.Now()
	_, err := Add(ctx, f, &Settings{Node: "n"}, "k", "c", "1.0.0")
	if err == nil || time.Since(started) > 250*time.Millisecond {
		t.Fatalf("%v after %v", err, time.Since(started))
	}
	if f.calls != 2 { // at 0 and 100 ms; the next, 200 ms later, would end past the deadline
		t.Errorf("%d calls, want 2", f.calls)
	}
}
