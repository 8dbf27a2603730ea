// Command ipam-cni is a CNI IPAM plugin (spec 1.1: ADD, DEL, CHECK, GC, STATUS, VERSION) that takes
// container addresses from the ipam allocator over gRPC.
package main

import (
	"runtime"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"
)

func main() {
	// One invocation makes one or two calls in sequence: a second P only wakes more threads for
	// grpc-go's goroutines, which costs more than it saves on a node busy starting containers.
	runtime.GOMAXPROCS(1)
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    cmdAdd,
		Del:    cmdDel,
		Check:  cmdCheck,
		GC:     cmdGC,
		Status: cmdStatus,
	}, version.All, "ipam-cni: container addresses from the ipam allocator")
}
