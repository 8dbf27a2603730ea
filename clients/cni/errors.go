package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/types"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Plugin-specific CNI error codes (the spec leaves 100 and above to plugins).
const (
	// ErrPoolCannotGrow: the node's pool is empty and the cloud cannot give it more (the node is at its
	// interface limits, its subnets are full, or its instance type is unknown). Retrying soon will not help.
	ErrPoolCannotGrow uint = 100
	// ErrCredentials: the allocator refused the token or the TLS identity.
	ErrCredentials uint = 101
	// ErrAddressNotHeld: CHECK found the attachment no longer holding its address.
	ErrAddressNotHeld uint = 102
)

// Reasons of RESOURCE_EXHAUSTED that a refill under way will resolve.
var refilling = map[string]bool{"POOL_EMPTY": true, "POOL_COOLING_DOWN": true}

// Reason is the ErrorInfo reason of an allocator status ("" when there is none).
func Reason(st *status.Status) string {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.Reason
		}
	}
	return ""
}

// CNIError turns an allocator call's failure into a CNI error with a clear message; `what` says
// what the plugin was doing.
func CNIError(what string, err error) *types.Error {
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		return cniErr
	}
	st, ok := status.FromError(err)
	if !ok {
		if errors.Is(err, context.DeadlineExceeded) {
			return types.NewError(types.ErrTryAgainLater, what+": the allocator did not answer within the deadline", err.Error())
		}
		return types.NewError(types.ErrInternal, what+": "+err.Error(), "")
	}
	reason := Reason(st)
	msg := fmt.Sprintf("%s: allocator said %s", what, st.Code())
	if reason != "" {
		msg += " (" + reason + ")"
	}
	details := st.Message()
	switch st.Code() {
	case codes.ResourceExhausted:
		if refilling[reason] {
			return types.NewError(types.ErrTryAgainLater, msg+": the node's pool is being refilled, try again later", details)
		}
		return types.NewError(ErrPoolCannotGrow, msg+": the node's pool cannot grow", details)
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.Aborted:
		return types.NewError(types.ErrTryAgainLater, msg+": the allocator or its store is unreachable, try again later", details)
	case codes.NotFound, codes.InvalidArgument, codes.FailedPrecondition:
		return types.NewError(types.ErrInvalidNetworkConfig, msg+": check ipam.node, ipam.pool and ipam.family", details)
	case codes.Unauthenticated, codes.PermissionDenied:
		return types.NewError(ErrCredentials, msg+": check ipam.tokenFile and ipam.tls", details)
	default:
		return types.NewError(types.ErrInternal, msg, details)
	}
}

// StatusError is STATUS's answer when the allocator cannot serve an ADD now.
func StatusError(err error) *types.Error {
	e := CNIError("status", err)
	return types.NewError(types.ErrPluginNotAvailable, e.Msg, e.Details)
}

// IsNotFound is true for an allocator status NOT_FOUND (an unknown node or pool).
func IsNotFound(err error) bool {
	return status.Code(err) == codes.NotFound
}
