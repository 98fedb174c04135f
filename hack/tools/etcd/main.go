// Command etcd is a thin wrapper around etcdmain.Main.
//
// go.etcd.io/etcd/server/v3 carries replace directives in its go.mod, so
// `go install go.etcd.io/etcd/server/v3@vX` is refused; requiring the module
// from this wrapper module and calling its entry point builds the same binary.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
