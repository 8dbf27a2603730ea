package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"sort"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	ipamv1 "ipam/clients/cni/gen/ipamv1"
)

// invocation is one verb's parsed input and its connection to the allocator.
type invocation struct {
	conf     *NetConf
	settings *Settings
	client   ipamv1.AllocatorClient
	ctx      context.Context
	close    func()
}

func begin(args *skel.CmdArgs) (*invocation, error) {
	conf, s, err := ParseConfig(args.StdinData, OSEnv)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	conn, client, err := Dial(s)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.Deadline)
	return &invocation{conf, s, client, ctx, func() { cancel(); _ = conn.Close() }}, nil
}

func wireFamily(f Family) ipamv1.Family {
	switch f {
	case FamilyIPv6:
		return ipamv1.Family_FAMILY_IPV6
	case FamilyDual:
		return ipamv1.Family_FAMILY_UNSPECIFIED
	default:
		return ipamv1.Family_FAMILY_IPV4
	}
}

func cmdAdd(args *skel.CmdArgs) error {
	inv, err := begin(args)
	if err != nil {
		return err
	}
	defer inv.close()
	result, err := Add(inv.ctx, inv.client, inv.settings, AttachmentKey(inv.settings.Network, args.ContainerID, args.IfName),
		Owner(args.ContainerID, args.Args), inv.conf.CNIVersion)
	if err != nil {
		return err
	}
	return result.Print()
}

// giveBackTimeout bounds the release after a failed ADD, also when the ADD's own deadline is spent.
const giveBackTimeout = 5 * time.Second

// Add allocates under the attachment's key and builds the result in cniVersion. When the allocation
// succeeded but its result cannot be given (the plugin refuses it, or it does not convert), what
// was allocated is released by the key before the error is answered: a failed ADD holds nothing.
func Add(ctx context.Context, client ipamv1.AllocatorClient, s *Settings, key, owner, cniVersion string) (types.Result, error) {
	request := &ipamv1.AllocateNextRequest{
		Node:           s.Node,
		Pool:           s.Pool,
		Family:         wireFamily(s.Family),
		Owner:          owner,
		IdempotencyKey: key,
		WaitForRefill:  true,
	}
	reply, err := retryKeyed(ctx, func(ctx context.Context) (*ipamv1.AllocateNextResponse, error) {
		return client.AllocateNext(ctx, request)
	})
	if err != nil {
		return nil, CNIError("add", err)
	}
	result, err := BuildResult(s, reply)
	if err != nil {
		return nil, giveBack(client, s, key, types.NewError(types.ErrInternal, "add: "+err.Error(), ""))
	}
	converted, err := result.GetAsVersion(cniVersion)
	if err != nil {
		return nil, giveBack(client, s, key, types.NewError(types.ErrIncompatibleCNIVersion, "add: "+err.Error(), ""))
	}
	return converted, nil
}

// giveBack releases what the attachment holds and answers `failure`; a release that fails too is
// said in its details (a runtime's DEL releases it later).
func giveBack(client ipamv1.AllocatorClient, s *Settings, key string, failure *types.Error) *types.Error {
	ctx, cancel := context.WithTimeout(context.Background(), giveBackTimeout)
	defer cancel()
	_, err := client.ReleaseByKey(ctx, &ipamv1.ReleaseByKeyRequest{Node: s.Node, Pool: s.Pool, IdempotencyKey: key})
	if err != nil && !IsNotFound(err) {
		failure.Details = fmt.Sprintf("the addresses allocated under %s stay held until DEL: %v", key, err)
	}
	return failure
}

// BuildResult is the delegated IPAM result of an allocation: each address with the prefix length of
// its subnet and its gateway, and the routes (the config's, else the node's VPC CIDRs via the
// gateway). A delegated result has no interfaces: the main plugin owns them.
func BuildResult(s *Settings, reply *ipamv1.AllocateNextResponse) (*current.Result, error) {
	result := &current.Result{CNIVersion: current.ImplementedSpecVersion, DNS: s.DNS}
	for _, a := range []*ipamv1.AllocationResult{reply.GetIpv4(), reply.GetIpv6()} {
		if a.GetIp() == "" {
			continue
		}
		ip := net.ParseIP(a.Ip)
		if ip == nil {
			return nil, fmt.Errorf("allocator returned %q, not an address", a.Ip)
		}
		_, subnet, err := net.ParseCIDR(a.SubnetCidr)
		if err != nil {
			return nil, fmt.Errorf("allocator returned no usable subnet for %s (%q)", a.Ip, a.SubnetCidr)
		}
		if !subnet.Contains(ip) {
			return nil, fmt.Errorf("allocator returned %s outside its subnet %s", a.Ip, a.SubnetCidr)
		}
		gw := net.ParseIP(a.GatewayIp)
		result.IPs = append(result.IPs, &current.IPConfig{Address: net.IPNet{IP: ip, Mask: subnet.Mask}, Gateway: gw})
		if s.Routes == nil {
			for _, cidr := range a.Cidrs {
				_, dst, err := net.ParseCIDR(cidr)
				if err != nil || (dst.IP.To4() == nil) != (ip.To4() == nil) {
					continue
				}
				result.Routes = append(result.Routes, &types.Route{Dst: *dst, GW: gw})
			}
		}
	}
	if len(result.IPs) == 0 {
		return nil, fmt.Errorf("allocator returned no address")
	}
	for _, r := range s.Routes {
		route := *r
		ipc := configOf(result, route.Dst.IP)
		if ipc == nil {
			continue // a route of a family the container has no address of (e.g. ::/0 for family ipv4)
		}
		if route.GW == nil {
			route.GW = ipc.Gateway
		}
		result.Routes = append(result.Routes, &route)
	}
	return result, nil
}

// configOf is the result's address of dst's family, nil when it has none.
func configOf(result *current.Result, dst net.IP) *current.IPConfig {
	for _, c := range result.IPs {
		if (c.Address.IP.To4() == nil) == (dst.To4() == nil) {
			return c
		}
	}
	return nil
}

func cmdDel(args *skel.CmdArgs) error {
	inv, err := begin(args)
	if err != nil {
		return err
	}
	defer inv.close()
	s := inv.settings
	request := &ipamv1.ReleaseByKeyRequest{
		Node:           s.Node,
		Pool:           s.Pool,
		IdempotencyKey: AttachmentKey(s.Network, args.ContainerID, args.IfName),
	}
	_, err = retryKeyed(inv.ctx, func(ctx context.Context) (*ipamv1.ReleaseResponse, error) {
		return inv.client.ReleaseByKey(ctx, request)
	})
	if err != nil && !IsNotFound(err) { // an unknown node or pool holds nothing to release
		return CNIError("del", err)
	}
	return nil
}

// heldAddresses lists the addresses the allocator holds for one attachment.
func (inv *invocation) heldAddresses(key string) (map[string]bool, error) {
	s := inv.settings
	reply, err := inv.client.ListAllocations(inv.ctx, &ipamv1.ListAllocationsRequest{Node: s.Node, Pool: s.Pool, KeyPrefix: key})
	if err != nil {
		return nil, err
	}
	held := map[string]bool{}
	for _, a := range reply.Allocations {
		if a.IdempotencyKey == key {
			held[a.Ip] = true
		}
	}
	return held, nil
}

func cmdCheck(args *skel.CmdArgs) error {
	inv, err := begin(args)
	if err != nil {
		return err
	}
	defer inv.close()
	s := inv.settings
	key := AttachmentKey(s.Network, args.ContainerID, args.IfName)
	held, err := inv.heldAddresses(key)
	if err != nil {
		return CNIError("check", err)
	}
	if len(held) == 0 {
		return types.NewError(ErrAddressNotHeld,
			fmt.Sprintf("check: attachment %s/%s holds no address in pool %s of node %s", args.ContainerID, args.IfName, s.Pool, s.Node), "")
	}
	expected, err := prevResultIPs(inv.conf.RawPrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "check: "+err.Error(), "")
	}
	for _, ip := range expected {
		if !held[ip] {
			return types.NewError(ErrAddressNotHeld,
				fmt.Sprintf("check: attachment %s/%s no longer holds %s in pool %s of node %s", args.ContainerID, args.IfName, ip, s.Pool, s.Node), "")
		}
	}
	return nil
}

// prevResultIPs are the addresses of the result the runtime cached for the attachment.
func prevResultIPs(raw json.RawMessage) ([]string, error) {
	if len(raw) == 0 {
		return nil, nil
	}
	var prev struct {
		IPs []struct {
			Address string `json:"address"`
		} `json:"ips"`
	}
	if err := json.Unmarshal(raw, &prev); err != nil {
		return nil, fmt.Errorf("prevResult: %w", err)
	}
	out := []string{}
	for _, c := range prev.IPs {
		ip, _, err := net.ParseCIDR(c.Address)
		if err != nil {
			return nil, fmt.Errorf("prevResult address %q: %w", c.Address, err)
		}
		out = append(out, ip.String())
	}
	return out, nil
}

// Stale is the attachments of this network the allocator holds that the valid list lacks, in order.
func Stale(network string, allocations []*ipamv1.KeyedAllocation, valid []types.GCAttachment) []string {
	live := map[types.GCAttachment]bool{}
	for _, a := range valid {
		live[a] = true
	}
	seen := map[string]bool{}
	var stale []string
	for _, a := range allocations {
		att, ok := ParseAttachmentKey(network, a.IdempotencyKey)
		if !ok || live[att] || seen[a.IdempotencyKey] {
			continue
		}
		seen[a.IdempotencyKey] = true
		stale = append(stale, a.IdempotencyKey)
	}
	sort.Strings(stale)
	return stale
}

func cmdGC(args *skel.CmdArgs) error {
	inv, err := begin(args)
	if err != nil {
		return err
	}
	defer inv.close()
	s := inv.settings
	valid := inv.conf.Attachments()
	if valid == nil {
		// No list is not an empty list: without one, nothing is known to be stale.
		fmt.Fprintln(os.Stderr, "gc: no cni.dev/valid-attachments given; nothing released")
		return nil
	}
	reply, err := inv.client.ListAllocations(inv.ctx, &ipamv1.ListAllocationsRequest{
		Node: s.Node, Pool: s.Pool, KeyPrefix: NetworkKeyPrefix(s.Network),
	})
	if err != nil {
		if IsNotFound(err) {
			return nil
		}
		return CNIError("gc", err)
	}
	for _, key := range Stale(s.Network, reply.Allocations, *valid) {
		_, err := inv.client.ReleaseByKey(inv.ctx, &ipamv1.ReleaseByKeyRequest{Node: s.Node, Pool: s.Pool, IdempotencyKey: key})
		if err != nil && !IsNotFound(err) {
			return CNIError("gc: releasing "+key, err)
		}
	}
	return nil
}

func cmdStatus(args *skel.CmdArgs) error {
	inv, err := begin(args)
	if err != nil {
		return err
	}
	defer inv.close()
	// A call that reads the node from the store: the allocator, its store and the node all answer.
	if _, err := inv.client.GetVpcCIDRs(inv.ctx, &ipamv1.GetVpcCIDRsRequest{Node: inv.settings.Node}); err != nil {
		return StatusError(err)
	}
	return nil
}
