-- wrk's script for benchmarks/serve.py: POST /v1/classify with one SMS text a request.
--   wrk -t1 -cN -dS --timeout 120s -s serve_wrk.lua URL -- BODIES CAP
-- BODIES: a file of JSON request bodies, one a line, sent in turn; CAP: the thread stops after
-- that many answers (a bound on count besides wrk's bound on time).
-- Prints, after wrk's own report, one line "npgpt-json {...}": the number of answers, the
-- duration, the latency of every answer (microseconds, as value/count pairs) and each answer's
-- status and timing headers (x-total-time, x-queue-time, x-inference-time, x-compute-tokens).

local threads = {}
function setup(thread) threads[#threads + 1] = thread end

local bodies, cap, sent, answered = {}, 0, 0, 0
log = {}                                        -- read by done() through thread:get

function init(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  cap = tonumber(args[2])
end

function request()
  sent = sent + 1
  return wrk.format("POST", "/v1/classify", {["Content-Type"] = "application/json"},
                    bodies[(sent - 1) % #bodies + 1])
end

local function header(headers, name)
  return headers[name] or headers[name:gsub("^%l", string.upper)] or "-1"
end

function response(status, headers, body)
  answered = answered + 1
  log[#log + 1] = table.concat({status, header(headers, "x-total-time"), header(headers, "x-queue-time"),
                                header(headers, "x-inference-time"), header(headers, "x-compute-tokens")}, " ")
  if answered >= cap then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local lat, answers = {}, {}
  for i = 1, #latency do
    local value, count = latency(i)
    lat[#lat + 1] = string.format("[%d,%d]", value, count)
  end
  for _, t in ipairs(threads) do
    for _, line in ipairs(t:get("log")) do answers[#answers + 1] = '"' .. line .. '"' end
  end
  io.write(string.format('npgpt-json {"requests":%d,"duration_us":%d,"socket_errors":%d,"latency_us":[%s],"answers":[%s]}\n',
                         summary.requests, summary.duration,
                         summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
                         table.concat(lat, ","), table.concat(answers, ",")))
end
