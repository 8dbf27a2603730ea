package main

import (
	"context"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Retries of keyed calls (ADD's AllocateNext and DEL's ReleaseByKey), which a retry cannot make take
// or release twice: the allocator answers UNAVAILABLE while it or its Redis cannot be reached (a
// restart, a Redis failover: nothing changed), and ABORTED OUTCOME_UNKNOWN when a change was sent
// but not confirmed. A Redis failover lasts a few seconds; the retries go on within the call's
// deadline (ipam.deadlineSeconds, 10 s by default), from 100 ms apart to 1 s apart.
const (
	firstRetryDelay = 100 * time.Millisecond
	maxRetryDelay   = time.Second
)

// retryable is true for the answers a keyed call may be asked again after.
func retryable(err error) bool {
	st, ok := status.FromError(err)
	if !ok {
		return false
	}
	switch st.Code() {
	case codes.Unavailable:
		return true
	case codes.Aborted:
		return Reason(st) == "OUTCOME_UNKNOWN"
	default:
		return false
	}
}

// retryKeyed makes a keyed call until it succeeds, fails for another reason, or the next try could
// not start before ctx's deadline; the last answer is returned.
func retryKeyed[T any](ctx context.Context, call func(context.Context) (T, error)) (T, error) {
	delay := firstRetryDelay
	for {
		reply, err := call(ctx)
		if err == nil || !retryable(err) {
			return reply, err
		}
		if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) <= delay {
			return reply, err
		}
		timer := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			timer.Stop()
			return reply, err
		case <-timer.C:
		}
		delay = min(delay*2, maxRetryDelay)
	}
}
