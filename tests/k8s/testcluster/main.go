// testcluster runs one of the processes of a Kubernetes control plane for tests, or
// kubectl, from the real code of the same release: `testcluster etcd ARGS...`,
// `testcluster kube-apiserver ARGS...`, `testcluster kube-controller-manager
// ARGS...`, `testcluster kubectl ARGS...`. Each takes its upstream binary's flags;
// ../env.sh starts them on 127.0.0.1.
package main

import (
	"fmt"
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: testcluster etcd|kube-apiserver|kube-controller-manager|kubectl [flags]")
		os.Exit(2)
	}
	which := os.Args[1]
	// Each command parses os.Args[1:] as its own argv (name first).
	os.Args = os.Args[1:]
	switch which {
	case "etcd":
		etcdmain.Main(os.Args)
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kubectl":
		if err := cli.RunNoErrOutput(kubectl.NewDefaultKubectlCommand()); err != nil {
			kubectlutil.CheckErr(err)
		}
	default:
		fmt.Fprintf(os.Stderr, "testcluster: unknown command %q\n", which)
		os.Exit(2)
	}
}
