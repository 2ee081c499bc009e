
$meshtrust/_proto/sds/discovery.protoenvoy.service.discovery.v3google/protobuf/any.protomeshtrust/_proto/sds/rpc.proto"”
DiscoveryRequest
version_info (	
resource_names (	
type_url (	
response_nonce (	(
error_detail (2.google.rpc.Status"s
DiscoveryResponse
version_info (	'
	resources (2.google.protobuf.Any
type_url (	
nonce (	"
DeltaDiscoveryRequest"
DeltaDiscoveryResponsebproto3