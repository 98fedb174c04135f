// Command pause is the pod sandbox's init process for the real node (hack/node-up.sh): it holds
// the pod's namespaces open until the runtime stops it. registry.k8s.io/pause cannot be pulled
// here (no registry is reachable), so hack/node-up.sh builds this into an image from scratch.
// It reaps children it inherits as PID 1 and exits 0 on SIGINT or SIGTERM.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	children := make(chan os.Signal, 8)
	signal.Notify(children, syscall.SIGCHLD)
	for {
		select {
		case <-stop:
			os.Exit(0)
		case <-children:
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
		}
	}
}
