package main

import (
	"context"
	"net"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"google.golang.org/grpc"

	ipamv1 "ipam/clients/cni/gen/ipamv1"
)

func TestResultHasPrefixLengthOfTheSubnetGatewayAndVPCRoutes(t *testing.T) {
	s := &Settings{}
	reply := &ipamv1.AllocateNextResponse{
		Ipv4: &ipamv1.AllocationResult{Ip: "10.0.1.17", SubnetCidr: "10.0.0.0/18", GatewayIp: "10.0.0.1", Cidrs: []string{"10.0.0.0/16", "2001:db8::/56"}},
	}
	r, err := BuildResult(s, reply)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.IPs) != 1 || r.IPs[0].Address.String() != "10.0.1.17/18" || r.IPs[0].Gateway.String() != "10.0.0.1" {
		t.Fatalf("ips %+v", r.IPs[0])
	}
	if len(r.Routes) != 1 || r.Routes[0].Dst.String() != "10.0.0.0/16" || r.Routes[0].GW.String() != "10.0.0.1" {
		t.Fatalf("routes %v", r.Routes)
	}
	if len(r.Interfaces) != 0 {
		t.Fatal("a delegated IPAM result has no interfaces")
	}
}

func TestDualStackAndConfiguredRoutes(t *testing.T) {
	_, def, _ := net.ParseCIDR("0.0.0.0/0")
	s := &Settings{Routes: []*types.Route{{Dst: *def}}}
	reply := &ipamv1.AllocateNextResponse{
		Ipv4: &ipamv1.AllocationResult{Ip: "10.0.1.17", SubnetCidr: "10.0.0.0/18", GatewayIp: "10.0.0.1", Cidrs: []string{"10.0.0.0/16"}},
		Ipv6: &ipamv1.AllocationResult{Ip: "2001:db8::10", SubnetCidr: "2001:db8::/64", GatewayIp: "fe80::1"},
	}
	r, err := BuildResult(s, reply)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.IPs) != 2 || r.IPs[1].Address.String() != "2001:db8::10/64" {
		t.Fatalf("ips %v", r.IPs)
	}
	if len(r.Routes) != 1 || r.Routes[0].Dst.String() != "0.0.0.0/0" || r.Routes[0].GW.String() != "10.0.0.1" {
		t.Fatalf("configured routes replace the VPC ones, with the family's gateway: %v", r.Routes)
	}
}

func TestDefaultRoutesGoThroughTheGatewayOfTheirFamilyAndOnlyForAFamilyAllocated(t *testing.T) {
	_, def4, _ := net.ParseCIDR("0.0.0.0/0")
	_, def6, _ := net.ParseCIDR("::/0")
	s := &Settings{Routes: []*types.Route{{Dst: *def4}, {Dst: *def6}}}
	v4 := &ipamv1.AllocationResult{Ip: "10.0.1.17", SubnetCidr: "10.0.0.0/18", GatewayIp: "10.0.0.1"}
	v6 := &ipamv1.AllocationResult{Ip: "2001:db8::10", SubnetCidr: "2001:db8::/64", GatewayIp: "fe80:ec2::1"}
	r, err := BuildResult(s, &ipamv1.AllocateNextResponse{Ipv4: v4, Ipv6: v6})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Routes) != 2 || r.Routes[0].GW.String() != "10.0.0.1" || r.Routes[1].GW.String() != "fe80:ec2::1" {
		t.Fatalf("dual stack: %v", r.Routes)
	}
	r, err = BuildResult(s, &ipamv1.AllocateNextResponse{Ipv6: v6})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Routes) != 1 || r.Routes[0].Dst.String() != "::/0" || r.Routes[0].GW.String() != "fe80:ec2::1" {
		t.Fatalf("IPv6 only: %v", r.Routes)
	}
}

func TestResultRefusesWhatCannotBeConfigured(t *testing.T) {
	for name, a := range map[string]*ipamv1.AllocationResult{
		"no subnet":      {Ip: "10.0.1.17"},
		"outside subnet": {Ip: "10.9.1.17", SubnetCidr: "10.0.0.0/18"},
		"bad ip":         {Ip: "ten", SubnetCidr: "10.0.0.0/18"},
	} {
		if _, err := BuildResult(&Settings{}, &ipamv1.AllocateNextResponse{Ipv4: a}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := BuildResult(&Settings{}, &ipamv1.AllocateNextResponse{}); err == nil {
		t.Error("an empty reply was accepted")
	}
}

func TestStaleSparesLiveAttachmentsAndOtherNetworks(t *testing.T) {
	allocs := []*ipamv1.KeyedAllocation{
		{Ip: "10.0.0.5", IdempotencyKey: "cni:net1/c1/eth0"},
		{Ip: "10.0.0.6", IdempotencyKey: "cni:net1/c2/eth0"},
		{Ip: "2001:db8::6", IdempotencyKey: "cni:net1/c2/eth0"},
		{Ip: "10.0.0.7", IdempotencyKey: "cni:net1/c1/eth1"},
		{Ip: "10.0.0.8", IdempotencyKey: "cni:net2/c3/eth0"},
		{Ip: "10.0.0.9", IdempotencyKey: ""},
	}
	stale := Stale("net1", allocs, []types.GCAttachment{{ContainerID: "c1", IfName: "eth0"}})
	if len(stale) != 2 || stale[0] != "cni:net1/c1/eth1" || stale[1] != "cni:net1/c2/eth0" {
		t.Fatalf("stale %v", stale)
	}
	if got := Stale("net1", allocs, nil); len(got) != 3 {
		t.Fatalf("an empty valid list makes every attachment of the network stale: %v", got)
	}
}

func TestPrevResultIPs(t *testing.T) {
	ips, err := prevResultIPs([]byte(`{"cniVersion":"1.0.0","ips":[{"address":"10.0.1.17/18","gateway":"10.0.0.1"}]}`))
	if err != nil || len(ips) != 1 || ips[0] != "10.0.1.17" {
		t.Fatalf("%v %v", ips, err)
	}
	if ips, err := prevResultIPs(nil); err != nil || ips != nil {
		t.Fatal("no prevResult")
	}
	if _, err := prevResultIPs([]byte(`{"ips":[{"address":"nope"}]}`)); err == nil {
		t.Fatal("bad address accepted")
	}
}

// fakeAllocator answers AllocateNext with `reply` and records the keys released.
type fakeAllocator struct {
	ipamv1.AllocatorClient
	reply    *ipamv1.AllocateNextResponse
	released []string
}

func (f *fakeAllocator) AllocateNext(context.Context, *ipamv1.AllocateNextRequest, ...grpc.CallOption) (*ipamv1.AllocateNextResponse, error) {
	return f.reply, nil
}

func (f *fakeAllocator) ReleaseByKey(_ context.Context, r *ipamv1.ReleaseByKeyRequest, _ ...grpc.CallOption) (*ipamv1.ReleaseResponse, error) {
	f.released = append(f.released, r.IdempotencyKey)
	return &ipamv1.ReleaseResponse{}, nil
}

func TestAFailedAddGivesBackWhatItAllocated(t *testing.T) {
	// An IPv6 address with the IPv4 subnet and gateway: refused.
	f := &fakeAllocator{reply: &ipamv1.AllocateNextResponse{
		Ipv4: &ipamv1.AllocationResult{Ip: "10.0.1.17", SubnetCidr: "10.0.0.0/18", GatewayIp: "10.0.0.1"},
		Ipv6: &ipamv1.AllocationResult{Ip: "2001:db8::10", SubnetCidr: "10.0.0.0/18", GatewayIp: "10.0.0.1"},
	}}
	if _, err := Add(context.Background(), f, &Settings{Node: "n"}, "cni:net/c1/eth0", "c1", "1.0.0"); err == nil {
		t.Fatal("accepted")
	}
	if len(f.released) != 1 || f.released[0] != "cni:net/c1/eth0" {
		t.Errorf("released %v", f.released)
	}
	f.reply.Ipv6.SubnetCidr, f.reply.Ipv6.GatewayIp = "2001:db8::/64", "fe80:ec2::1"
	f.released = nil
	if r, err := Add(context.Background(), f, &Settings{Node: "n"}, "cni:net/c2/eth0", "c2", "1.0.0"); err != nil || r == nil || len(f.released) != 0 {
		t.Fatalf("a good ADD: %v, released %v", err, f.released)
	}
}
