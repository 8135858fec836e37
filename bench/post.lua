-- wrk: every request is the same small OpenAI-style chat completion POST.
wrk.method = "POST"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
wrk.headers["Content-Type"] = "application/json"
