// Command etcd is the etcd server, started by tests/kube/start.sh for iamlet's tests.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
