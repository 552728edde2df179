// Package kubernetes holds ctd's Kubernetes manifests; its test decodes
// them with the Kubernetes API types.
package kubernetes

import (
	"bytes"
	"os"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// decode splits the manifest into its documents and decodes the
// ConfigMap and the DaemonSet strictly (an unknown field is an error).
func decode(t *testing.T) (*corev1.ConfigMap, *appsv1.DaemonSet) {
	t.Helper()
	b, err := os.ReadFile("ctd.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cm *corev1.ConfigMap
	var ds *appsv1.DaemonSet
	for _, doc := range bytes.Split(b, []byte("\n---\n")) {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			t.Fatal(err)
		}
		switch meta.Kind {
		case "ConfigMap":
			cm = &corev1.ConfigMap{}
			if err := yaml.UnmarshalStrict(doc, cm); err != nil {
				t.Fatalf("ConfigMap: %v", err)
			}
		case "DaemonSet":
			ds = &appsv1.DaemonSet{}
			if err := yaml.UnmarshalStrict(doc, ds); err != nil {
				t.Fatalf("DaemonSet: %v", err)
			}
		default:
			t.Fatalf("unexpected document of kind %q", meta.Kind)
		}
	}
	if cm == nil || ds == nil {
		t.Fatalf("ctd.yaml must hold a ConfigMap and a DaemonSet")
	}
	return cm, ds
}

func TestDaemonSet(t *testing.T) {
	cm, ds := decode(t)
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Error("the pod must use the host network: ctd attaches to the node's interfaces")
	}
	if s := ds.Spec.UpdateStrategy; s.Type != appsv1.RollingUpdateDaemonSetStrategyType ||
		s.RollingUpdate == nil || s.RollingUpdate.MaxUnavailable == nil || s.RollingUpdate.MaxUnavailable.IntValue() != 1 {
		t.Errorf("update strategy %+v, want RollingUpdate with maxUnavailable 1", s)
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	if !slices.Contains(c.Args, "daemon") || !slices.Contains(c.Args, "--node-name=$(NODE_NAME)") {
		t.Errorf("args %v must run 'ctd daemon --node-name=$(NODE_NAME)'", c.Args)
	}

	// The bpffs mount.
	var bpffs string
	for _, v := range spec.Volumes {
		if v.HostPath != nil && v.HostPath.Path == "/sys/fs/bpf" {
			bpffs = v.Name
		}
	}
	if bpffs == "" {
		t.Error("no hostPath volume of /sys/fs/bpf")
	}
	if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
		return m.Name == bpffs && m.MountPath == "/sys/fs/bpf"
	}) {
		t.Error("the bpffs volume is not mounted at /sys/fs/bpf")
	}

	// The capabilities ctd needs, without running privileged.
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("no securityContext capabilities")
	}
	for _, want := range []corev1.Capability{"BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"} {
		if !slices.Contains(sc.Capabilities.Add, want) {
			t.Errorf("capability %s missing from %v", want, sc.Capabilities.Add)
		}
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("the container runs privileged; the capabilities are enough")
	}
	if sc.RunAsUser == nil || *sc.RunAsUser != 0 {
		t.Error("ctd checks for uid 0: runAsUser must be 0")
	}

	// The etcd endpoints come from the ConfigMap.
	env := make(map[string]corev1.EnvVar)
	for _, e := range c.Env {
		env[e.Name] = e
	}
	ep, ok := env["CTD_KVSTORE_ENDPOINTS"]
	if !ok || ep.ValueFrom == nil || ep.ValueFrom.ConfigMapKeyRef == nil {
		t.Fatal("CTD_KVSTORE_ENDPOINTS must come from a ConfigMap")
	}
	ref := ep.ValueFrom.ConfigMapKeyRef
	if ref.Name != cm.Name {
		t.Errorf("CTD_KVSTORE_ENDPOINTS refers to ConfigMap %q, the manifest defines %q", ref.Name, cm.Name)
	}
	if v := cm.Data[ref.Key]; v == "" || !strings.Contains(v, "://") {
		t.Errorf("ConfigMap key %q = %q, want etcd URLs", ref.Key, v)
	}
	if cm.Namespace != ds.Namespace {
		t.Errorf("ConfigMap in namespace %q, DaemonSet in %q", cm.Namespace, ds.Namespace)
	}
	if n, ok := env["NODE_NAME"]; !ok || n.ValueFrom == nil || n.ValueFrom.FieldRef == nil || n.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Error("NODE_NAME must be the pod's spec.nodeName")
	}
	if sel, labels := ds.Spec.Selector.MatchLabels, ds.Spec.Template.Labels; sel["app.kubernetes.io/name"] == "" || sel["app.kubernetes.io/name"] != labels["app.kubernetes.io/name"] {
		t.Errorf("selector %v does not match the template's labels %v", sel, labels)
	}
}
