
meshtrust/_proto/sds/rpc.proto
google.rpc"'
Status
code (
message (	bproto3