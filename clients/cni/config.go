package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
)

const (
	defaultAllocator = "127.0.0.1:50051"
	defaultPool      = "default"
	defaultDeadline  = 10 * time.Second
	maxDeadline      = 10 * time.Minute
	// keyPrefix starts every idempotency key this plugin gives the allocator; the network name follows.
	keyPrefix = "cni:"
	// The allocator's limit on owners and idempotency keys.
	maxTextLength = 256
)

// Family is the address family asked for.
type Family string

const (
	FamilyIPv4 Family = "ipv4"
	FamilyIPv6 Family = "ipv6"
	FamilyDual Family = "dual"
)

// TLSConfig names the files of a TLS connection to the allocator.
type TLSConfig struct {
	CAFile     string `json:"caFile,omitempty"`
	CertFile   string `json:"certFile,omitempty"`
	KeyFile    string `json:"keyFile,omitempty"`
	ServerName string `json:"serverName,omitempty"`
}

// IPAMConfig is the plugin's own section of the network config (its "ipam" object).
type IPAMConfig struct {
	Type string `json:"type"`
	// Allocator is host:port, or unix:///path/to/socket.
	Allocator string     `json:"allocator,omitempty"`
	TLS       *TLSConfig `json:"tls,omitempty"`
	// TokenFile holds the client token; the token itself never sits in the network config.
	TokenFile string `json:"tokenFile,omitempty"`
	// Node defaults to $NODE_NAME, then to the host name.
	Node            string         `json:"node,omitempty"`
	Pool            string         `json:"pool,omitempty"`
	Family          Family         `json:"family,omitempty"`
	DeadlineSeconds float64        `json:"deadlineSeconds,omitempty"`
	Routes          []*types.Route `json:"routes,omitempty"`
	DNS             types.DNS      `json:"dns,omitempty"`
}

// NetConf is what the plugin reads on stdin: the network config, with the runtime's additions.
type NetConf struct {
	CNIVersion string     `json:"cniVersion"`
	Name       string     `json:"name"`
	IPAM       IPAMConfig `json:"ipam"`
	// GC only: the attachments still in use; nil when the runtime sent no list.
	ValidAttachments *[]types.GCAttachment `json:"cni.dev/valid-attachments,omitempty"`
	// The name an early version of the spec used for the same list.
	OldValidAttachments *[]types.GCAttachment `json:"cni.dev/attachments,omitempty"`
	RawPrevResult       json.RawMessage       `json:"prevResult,omitempty"`
}

// Settings is the validated configuration of one invocation.
type Settings struct {
	Network   string
	Allocator string
	TLS       *TLSConfig
	Token     string
	Node      string
	Pool      string
	Family    Family
	Deadline  time.Duration
	Routes    []*types.Route
	DNS       types.DNS
}

// Env is what the configuration may take from outside the network config.
type Env struct {
	Getenv   func(string) string
	Hostname func() (string, error)
	ReadFile func(string) ([]byte, error)
}

// OSEnv is the process's environment.
var OSEnv = Env{Getenv: os.Getenv, Hostname: os.Hostname, ReadFile: os.ReadFile}

// forbiddenKeys are secrets that must not be written into a network config (runtimes log and cache it).
var forbiddenKeys = []string{"token", "password", "secret"}

// ParseConfig decodes and validates the network config given on stdin.
func ParseConfig(stdin []byte, env Env) (*NetConf, *Settings, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(stdin, conf); err != nil {
		return nil, nil, fmt.Errorf("network config is not valid JSON: %w", err)
	}
	var raw struct {
		IPAM map[string]json.RawMessage `json:"ipam"`
	}
	if err := json.Unmarshal(stdin, &raw); err != nil {
		return nil, nil, fmt.Errorf("network config is not valid JSON: %w", err)
	}
	for _, k := range forbiddenKeys {
		if _, found := raw.IPAM[k]; found {
			return nil, nil, fmt.Errorf("ipam.%s must not be in the network config: put the token in a file named by ipam.tokenFile", k)
		}
	}
	if conf.Name == "" {
		return nil, nil, fmt.Errorf("network config has no name")
	}
	if strings.ContainsAny(conf.Name, "/\t\n") {
		return nil, nil, fmt.Errorf("network name %q may not contain '/' or whitespace", conf.Name)
	}
	c := conf.IPAM
	s := &Settings{
		Network:   conf.Name,
		Allocator: c.Allocator,
		TLS:       c.TLS,
		Node:      c.Node,
		Pool:      c.Pool,
		Family:    c.Family,
		Routes:    c.Routes,
		DNS:       c.DNS,
	}
	if s.Allocator == "" {
		s.Allocator = defaultAllocator
	}
	if s.Node == "" {
		s.Node = env.Getenv("NODE_NAME")
	}
	if s.Node == "" {
		host, err := env.Hostname()
		if err != nil {
			return nil, nil, fmt.Errorf("no ipam.node and no host name: %w", err)
		}
		s.Node = host
	}
	if s.Pool == "" {
		s.Pool = defaultPool
	}
	switch s.Family {
	case "":
		s.Family = FamilyIPv4
	case FamilyIPv4, FamilyIPv6, FamilyDual:
	default:
		return nil, nil, fmt.Errorf("ipam.family %q is not one of ipv4, ipv6, dual", c.Family)
	}
	switch {
	case c.DeadlineSeconds == 0:
		s.Deadline = defaultDeadline
	case c.DeadlineSeconds < 0 || c.DeadlineSeconds > maxDeadline.Seconds():
		return nil, nil, fmt.Errorf("ipam.deadlineSeconds %v is not within (0, %v]", c.DeadlineSeconds, maxDeadline.Seconds())
	default:
		s.Deadline = time.Duration(c.DeadlineSeconds * float64(time.Second))
	}
	if c.TokenFile != "" {
		data, err := env.ReadFile(c.TokenFile)
		if err != nil {
			return nil, nil, fmt.Errorf("ipam.tokenFile: %w", err)
		}
		s.Token = strings.TrimSpace(string(data))
		if s.Token == "" {
			return nil, nil, fmt.Errorf("ipam.tokenFile %s is empty", c.TokenFile)
		}
	}
	if s.TLS != nil && (s.TLS.CertFile == "") != (s.TLS.KeyFile == "") {
		return nil, nil, fmt.Errorf("ipam.tls needs both certFile and keyFile, or neither")
	}
	return conf, s, nil
}

// Attachments is the runtime's list of valid attachments of a GC call (nil when none was sent).
func (c *NetConf) Attachments() *[]types.GCAttachment {
	if c.ValidAttachments != nil {
		return c.ValidAttachments
	}
	return c.OldValidAttachments
}

// AttachmentKey is the idempotency key of one attachment: network, container id, interface name.
// Container ids and interface names cannot hold '/', so the key splits back unambiguously.
func AttachmentKey(network, containerID, ifName string) string {
	return NetworkKeyPrefix(network) + containerID + "/" + ifName
}

// NetworkKeyPrefix starts the key of every attachment of one network.
func NetworkKeyPrefix(network string) string {
	return keyPrefix + network + "/"
}

// ParseAttachmentKey is AttachmentKey backwards; ok is false for a key of another network or form.
func ParseAttachmentKey(network, key string) (types.GCAttachment, bool) {
	rest, found := strings.CutPrefix(key, NetworkKeyPrefix(network))
	if !found {
		return types.GCAttachment{}, false
	}
	containerID, ifName, found := strings.Cut(rest, "/")
	if !found || containerID == "" || ifName == "" {
		return types.GCAttachment{}, false
	}
	return types.GCAttachment{ContainerID: containerID, IfName: ifName}, true
}

// Owner is the container id, with the pod's namespace/name when CNI_ARGS names it, within the
// allocator's length limit.
func Owner(containerID, cniArgs string) string {
	args := ParseCNIArgs(cniArgs)
	owner := containerID
	if ns, name := args["K8S_POD_NAMESPACE"], args["K8S_POD_NAME"]; ns != "" && name != "" {
		owner = containerID + " " + ns + "/" + name
	}
	if len(owner) > maxTextLength {
		owner = owner[:maxTextLength]
	}
	return owner
}

// ParseCNIArgs splits CNI_ARGS ("K1=V1;K2=V2"); malformed pairs are skipped.
func ParseCNIArgs(s string) map[string]string {
	out := map[string]string{}
	for _, pair := range strings.Split(s, ";") {
		k, v, found := strings.Cut(pair, "=")
		if found && k != "" {
			out[k] = v
		}
	}
	return out
}
