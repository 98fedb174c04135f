module rlops.dev/hack/tools/pause

go 1.24
