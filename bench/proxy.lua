-- wrk script for the forward-proxy contenders: wrk connects to the proxy's address and sends an
-- absolute-form request for BENCH_URL (e.g. http://bench.local/) with a matching Host header.
local url = os.getenv("BENCH_URL") or "http://bench.local/"
wrk.path = url
wrk.headers["Host"] = url:match("^%a+://([^/]+)")
