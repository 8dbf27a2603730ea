package main

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
)

func testEnv(vars map[string]string, files map[string]string) Env {
	return Env{
		Getenv:   func(k string) string { return vars[k] },
		Hostname: func() (string, error) { return "host-a", nil },
		ReadFile: func(p string) ([]byte, error) {
			if v, ok := files[p]; ok {
				return []byte(v), nil
			}
			return nil, errors.New("no such file")
		},
	}
}

func TestDefaults(t *testing.T) {
	_, s, err := ParseConfig([]byte(`{"cniVersion":"1.1.0","name":"net1","ipam":{"type":"ipam-cni"}}`), testEnv(nil, nil))
	if err != nil {
		t.Fatal(err)
	}
	if s.Allocator != defaultAllocator || s.Node != "host-a" || s.Pool != "default" || s.Family != FamilyIPv4 ||
		s.Deadline != defaultDeadline || s.Token != "" || s.Network != "net1" {
		t.Fatalf("unexpected defaults: %+v", s)
	}
}

func TestNodeFromEnvironmentThenConfig(t *testing.T) {
	env := testEnv(map[string]string{"NODE_NAME": "node-env"}, nil)
	_, s, err := ParseConfig([]byte(`{"name":"n","ipam":{}}`), env)
	if err != nil || s.Node != "node-env" {
		t.Fatalf("node from NODE_NAME: %+v %v", s, err)
	}
	_, s, err = ParseConfig([]byte(`{"name":"n","ipam":{"node":"node-conf"}}`), env)
	if err != nil || s.Node != "node-conf" {
		t.Fatalf("node from config: %+v %v", s, err)
	}
}

func TestAllFields(t *testing.T) {
	conf := `{"cniVersion":"1.0.0","name":"n","ipam":{"type":"ipam-cni","allocator":"unix:///run/ipam.sock",
	  "tokenFile":"/etc/tok","tls":{"caFile":"/ca","serverName":"alloc"},"pool":"p1","family":"dual",
	  "deadlineSeconds":2.5,"routes":[{"dst":"0.0.0.0/0"}]}}`
	_, s, err := ParseConfig([]byte(conf), testEnv(nil, map[string]string{"/etc/tok": " secret-token\n"}))
	if err != nil {
		t.Fatal(err)
	}
	if s.Allocator != "unix:///run/ipam.sock" || s.Token != "secret-token" || s.TLS.CAFile != "/ca" ||
		s.Pool != "p1" || s.Family != FamilyDual || s.Deadline != 2500*time.Millisecond || len(s.Routes) != 1 {
		t.Fatalf("unexpected settings: %+v", s)
	}
}

func TestRefusedConfigs(t *testing.T) {
	cases := map[string]string{
		"not json":         `{`,
		"no name":          `{"ipam":{}}`,
		"slash in name":    `{"name":"a/b","ipam":{}}`,
		"token in config":  `{"name":"n","ipam":{"token":"abc"}}`,
		"bad family":       `{"name":"n","ipam":{"family":"ipv5"}}`,
		"negative":         `{"name":"n","ipam":{"deadlineSeconds":-1}}`,
		"too long":         `{"name":"n","ipam":{"deadlineSeconds":3600}}`,
		"missing token":    `{"name":"n","ipam":{"tokenFile":"/nope"}}`,
		"empty token":      `{"name":"n","ipam":{"tokenFile":"/empty"}}`,
		"cert without key": `{"name":"n","ipam":{"tls":{"certFile":"/c"}}}`,
	}
	for name, conf := range cases {
		if _, _, err := ParseConfig([]byte(conf), testEnv(nil, map[string]string{"/empty": "\n"})); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	_, _, err := ParseConfig([]byte(`{"name":"n","ipam":{"token":"abc"}}`), testEnv(nil, nil))
	if !strings.Contains(err.Error(), "tokenFile") {
		t.Errorf("token refusal does not point at tokenFile: %v", err)
	}
}

func TestValidAttachmentsUnderBothNames(t *testing.T) {
	conf, _, _ := ParseConfig([]byte(`{"name":"n","ipam":{}}`), testEnv(nil, nil))
	if conf.Attachments() != nil {
		t.Fatal("no list must stay nil (not an empty list)")
	}
	conf, _, _ = ParseConfig([]byte(`{"name":"n","ipam":{},"cni.dev/valid-attachments":[]}`), testEnv(nil, nil))
	if a := conf.Attachments(); a == nil || len(*a) != 0 {
		t.Fatal("an empty list must be an empty list")
	}
	conf, _, _ = ParseConfig([]byte(`{"name":"n","ipam":{},"cni.dev/attachments":[{"containerID":"c1","ifname":"eth0"}]}`), testEnv(nil, nil))
	if a := conf.Attachments(); a == nil || (*a)[0] != (types.GCAttachment{ContainerID: "c1", IfName: "eth0"}) {
		t.Fatalf("old name not read: %v", a)
	}
}

func TestAttachmentKeyRoundTrip(t *testing.T) {
	key := AttachmentKey("net1", "abc123", "eth0")
	if key != "cni:net1/abc123/eth0" {
		t.Fatalf("key %q", key)
	}
	att, ok := ParseAttachmentKey("net1", key)
	if !ok || att != (types.GCAttachment{ContainerID: "abc123", IfName: "eth0"}) {
		t.Fatalf("parsed %v %v", att, ok)
	}
	for _, other := range []string{"cni:net10/abc/eth0", "cni:net1/abc", "cni:net1//eth0", "other", ""} {
		if _, ok := ParseAttachmentKey("net1", other); ok {
			t.Errorf("%q parsed as an attachment of net1", other)
		}
	}
}

func TestOwner(t *testing.T) {
	if o := Owner("cid", ""); o != "cid" {
		t.Errorf("owner %q", o)
	}
	if o := Owner("cid", "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0"); o != "cid ns/web-0" {
		t.Errorf("owner %q", o)
	}
	if o := Owner("cid", "K8S_POD_NAMESPACE=ns"); o != "cid" {
		t.Errorf("owner with a namespace alone %q", o)
	}
	if o := Owner("cid", "K8S_POD_NAMESPACE=ns;K8S_POD_NAME="+strings.Repeat("x", 300)); len(o) != maxTextLength || !strings.HasPrefix(o, "cid ns/") {
		t.Errorf("long owner not cut to %d: %d", maxTextLength, len(o))
	}
}

func TestTarget(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:50051":     "passthrough:///127.0.0.1:50051",
		"unix:///run/x.sock":  "unix:///run/x.sock",
		"unix:rel.sock":       "unix:rel.sock",
		"dns:///alloc:50051":  "dns:///alloc:50051",
		"allocator.svc:50051": "passthrough:///allocator.svc:50051",
	} {
		if got := Target(in); got != want {
			t.Errorf("Target(%q) = %q, want %q", in, got, want)
		}
	}
}
