-- wrk script: POST realistic, distinct KonPro webhook deliveries and print a JSON summary.
--
-- Every request is unique: the video id and the KonPro-Event-Id header are built from a run id
-- (BENCH_RUN_ID), the wrk thread number and a per-thread counter. Event types rotate over the
-- five kinds KonPro sends. 2xx answers are counted per thread in response(); done() prints one
-- line "BENCH_JSON {...}" that the harness parses.

local run_id = os.getenv("BENCH_RUN_ID") or tostring(os.time())
local threads = {}
local next_thread = 0

function setup(thread)
   thread:set("tid", next_thread)
   next_thread = next_thread + 1
   table.insert(threads, thread)
end

-- Per-thread state; ok and non2xx are globals so that done() can read them with thread:get().
local counter = 0
ok = 0
non2xx = 0

local templates = {
   {"avatar_video.success",
    '{"event_type":"avatar_video.success","event_data":{"video_id":"%s",' ..
    '"url":"https://resource.konpro.ai/video/%s.mp4?Expires=1767225600&Signature=Zm9vYmFy",' ..
    '"gif_download_url":"https://resource.konpro.ai/gif/%s.gif",' ..
    '"video_share_page_url":"https://app.konpro.ai/share/%s",' ..
    '"folder_id":"f-2024-campaign","callback_id":"cb-%s","duration":31.52}}'},
   {"avatar_video.fail",
    '{"event_type":"avatar_video.fail","event_data":{"video_id":"%s",' ..
    '"msg":"Avatar rendering failed: voice clip too long (%s)","error_code":400140,' ..
    '"callback_id":"cb-%s","detail":"retry with a shorter script","folder_id":"%s","x":"%s"}}'},
   {"video_translate.success",
    '{"event_type":"video_translate.success","event_data":{"video_translate_id":"%s",' ..
    '"url":"https://resource.konpro.ai/translate/%s.mp4","output_language":"Spanish",' ..
    '"callback_id":"cb-%s","title":"Quarterly update %s","source_video_id":"%s"}}'},
   {"video_translate.fail",
    '{"event_type":"video_translate.fail","event_data":{"video_translate_id":"%s",' ..
    '"message":"Source video has no detectable speech (%s)","output_language":"German",' ..
    '"callback_id":"cb-%s","title":"Onboarding %s","source_video_id":"%s"}}'},
   {"personalized_video",
    '{"event_type":"personalized_video","event_data":{"project_id":"p-%s",' ..
    '"video_id":"%s","status":"completed","callback_id":"cb-%s",' ..
    '"url":"https://resource.konpro.ai/personalized/%s.mp4","recipient":"lead-%s"}}'},
}

function request()
   counter = counter + 1
   local id = string.format("%s-%s-%d", run_id, tostring(tid), counter)
   local t = templates[(counter % #templates) + 1]
   local body = string.format(t[2], id, id, id, id, id)
   local headers = {
      ["Content-Type"] = "application/json",
      ["KonPro-Event-Id"] = "evt-" .. id,
      ["KonPro-Timestamp"] = tostring(os.time()),
      ["User-Agent"] = "KonPro-Webhooks/1.0",
   }
   return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
   if status >= 200 and status < 300 then
      ok = ok + 1
   else
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local total_ok, total_non2xx = 0, 0
   for _, thread in ipairs(threads) do
      total_ok = total_ok + (thread:get("ok") or 0)
      total_non2xx = total_non2xx + (thread:get("non2xx") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"ok":%d,"non2xx":%d,"duration_us":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
      summary.requests, total_ok, total_non2xx, summary.duration,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
