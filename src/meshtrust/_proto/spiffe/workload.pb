
&meshtrust/_proto/spiffe/workload.protogoogle/protobuf/struct.proto"
X509SVIDRequest"¶
X509SVIDResponse
svids (2	.X509SVID
crl (B
federated_bundles (2'.X509SVIDResponse.FederatedBundlesEntry7
FederatedBundlesEntry
key (	
value (:8"e
X509SVID
	spiffe_id (	
	x509_svid (
x509_svid_key (
bundle (
hint (	"
X509BundlesRequest"†
X509BundlesResponse
crl (2
bundles (2!.X509BundlesResponse.BundlesEntry.
BundlesEntry
key (	
value (:8"5
JWTSVIDRequest
audience (	
	spiffe_id (	"*
JWTSVIDResponse
svids (2.JWTSVID"8
JWTSVID
	spiffe_id (	
svid (	
hint (	"
JWTBundlesRequest"w
JWTBundlesResponse1
bundles (2 .JWTBundlesResponse.BundlesEntry.
BundlesEntry
key (	
value (:8"8
ValidateJWTSVIDRequest
audience (	
svid (	"U
ValidateJWTSVIDResponse
	spiffe_id (	'
claims (2.google.protobuf.Struct2Ã
SpiffeWorkloadAPI6
FetchX509SVID.X509SVIDRequest.X509SVIDResponse0?
FetchX509Bundles.X509BundlesRequest.X509BundlesResponse01
FetchJWTSVID.JWTSVIDRequest.JWTSVIDResponse<
FetchJWTBundles.JWTBundlesRequest.JWTBundlesResponse0D
ValidateJWTSVID.ValidateJWTSVIDRequest.ValidateJWTSVIDResponsebproto3