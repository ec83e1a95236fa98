// Command etcd is the stock etcd server of the pinned go.etcd.io/etcd/server/v3, built for the e2e suite.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
