-- wrk: every request is the same realistic chat completion POST, the body of bench/chat.json
-- (bench/run.py runs wrk from the repository's root).
local f = assert(io.open("bench/chat.json", "r"))
wrk.method = "POST"
wrk.body = f:read("*a"):gsub("%s+$", "")
wrk.headers["Content-Type"] = "application/json"
f:close()
