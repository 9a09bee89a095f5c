-- The gateway's Prometheus metrics: counted on the request path, shown by admin.lua at
-- GET /metrics (admin server, bearer token) in the text exposition format 0.0.4.
--
-- Theory of operation. A request costs one addition in a per-worker Lua table, no shared-dict
-- lock and no string building: pending[route name][status class] (router.header_filter for the
-- proxied requests, pages.lua for the answers the gateway writes itself). Every second a timer in
-- each worker moves its pending counts into lua_shared_dict "flatnet_metrics" with incr() and
-- starts a fresh table; the worker answering a scrape moves its own first, and a worker that exits
-- (reload, stop) moves what is left in exit_worker_by_lua. So a scrape lags the other workers by at
-- most a second and nothing counted is lost on a reload. The counters live in the shared dict:
-- they survive `nginx -s reload` and start again at zero on a restart (up_since tells which).
--
-- Keys in the dict:
--   "req <class> <route>"   requests answered, class = first digit of the status ("" route: none)
--   "fail <route>"          502/503/504 answered by @flatnet_unavailable
--   "changes"               admin API writes that changed the routes
--   "dropped"               increments that found no room (series cap, dict full)
--   "series"                how many "req"/"fail" keys exist (the cap is checked against it)
--   "up_since"              ngx.now() when the dict was first filled (the master's first start)
--
-- The series are capped (settings.metrics_max_series, the dict is sized for it in render.py) and
-- new keys are added with safe_add, which never evicts: a counter never goes backwards. The gateway
-- keeps a deleted route's counters, so route churn could fill the cap over months; when a new
-- series finds the cap reached, counters of routes that no longer exist are pruned (at most once a
-- minute, all workers together), and what still finds no room is added to "dropped".

local M = {}

local dict = ngx.shared.flatnet_metrics
local floor = math.floor

local FLUSH_INTERVAL = 1 -- seconds
local PRUNE_INTERVAL = 60 -- seconds between prunes at the cap
local META_KEYS = { "changes", "dropped", "series" }

local max_series = 4096
local live_routes = nil -- function() -> {name = route}, given to start()

-- This worker's counts since its last flush. Replaced (not cleared) at each flush, so routes that
-- are gone do not linger here.
local pending = {}
local pending_failures = {}

-- ---------------------------------------------------------------------------------------------
-- the request path

-- One response sent for `route_name` ("" when no route matched) with HTTP status `status`.
function M.count_response(route_name, status)
    local by_class = pending[route_name]
    if by_class == nil then
        by_class = { 0, 0, 0, 0, 0 }
        pending[route_name] = by_class
    end
    local class = floor(status / 100)
    by_class[class] = (by_class[class] or 0) + 1
end

-- One request for `route_name` whose backends all failed (502/503/504 from nginx itself).
function M.count_upstream_failure(route_name)
    pending_failures[route_name] = (pending_failures[route_name] or 0) + 1
end

-- Admin path (rare): straight into the dict.
function M.count_route_change()
    dict:incr("changes", 1, 0)
end

-- ---------------------------------------------------------------------------------------------
-- moving counts into the shared dict

local function prune()
    if not live_routes or not dict:add("pruning", true, PRUNE_INTERVAL) then
        return
    end
    local routes = live_routes()
    local kept = 0
    for _, key in ipairs(dict:get_keys(0)) do
        local route = key:match("^req %d+ (.*)$") or key:match("^fail (.*)$")
        if route then
            if route ~= "" and not routes[route] then
                dict:delete(key)
            else
                kept = kept + 1
            end
        end
    end
    dict:set("series", kept)
end

local function take_slot()
    local n = dict:incr("series", 1, 0)
    if n and n <= max_series then
        return true
    end
    dict:incr("series", -1, 0)
    return false
end

local function store(key, n)
    if dict:incr(key, n) then
        return
    end
    -- A new series. safe_add never evicts another key to make room (add would).
    local slot = take_slot()
    if not slot then
        prune()
        slot = take_slot()
    end
    if slot then
        local ok, err = dict:safe_add(key, 0)
        if not ok then
            dict:incr("series", -1, 0) -- "exists" (another worker just added it) or "no memory"
            if err ~= "exists" then
                ngx.log(ngx.WARN, "flatnet: metrics dict: cannot add ", key, ": ", err)
            end
        end
        if dict:incr(key, n) then
            return
        end
    end
    dict:incr("dropped", n, 0)
end

function M.flush()
    if next(pending) == nil and next(pending_failures) == nil then
        return
    end
    local requests, failures = pending, pending_failures
    pending, pending_failures = {}, {}
    for name, by_class in pairs(requests) do
        for class, n in pairs(by_class) do
            if n > 0 then
                store("req " .. class .. " " .. name, n)
            end
        end
    end
    for name, n in pairs(failures) do
        store("fail " .. name, n)
    end
end

-- init_by_lua (master; again at every reload, when the dict already holds the counters).
function M.init(settings)
    max_series = settings.metrics_max_series or max_series
    dict:add("up_since", ngx.now())
    for _, key in ipairs(META_KEYS) do
        dict:add(key, 0)
    end
end

-- init_worker_by_lua: flush every second. `routes_fn` returns the current routes by name (prune).
function M.start(routes_fn)
    live_routes = routes_fn
    local ok, err = ngx.timer.every(FLUSH_INTERVAL, M.flush)
    if not ok then
        ngx.log(ngx.ERR, "flatnet: cannot start the metrics flush: ", err)
    end
end

-- ---------------------------------------------------------------------------------------------
-- the exposition (text format 0.0.4)

local ESCAPES = { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }

function M.escape_label(value)
    return (tostring(value):gsub('[\\"\n]', ESCAPES))
end

local function sample(out, name, labels, value)
    out[#out + 1] = name .. labels .. " " .. value
end

local function family(out, name, kind, help)
    out[#out + 1] = "# HELP " .. name .. " " .. help
    out[#out + 1] = "# TYPE " .. name .. " " .. kind
end

local function count(v)
    return string.format("%d", v or 0)
end

-- The whole page. `snap` is state.snapshot(); `peer_status(peer)` is health.peer_status.
function M.render(snap, peer_status)
    local esc = M.escape_label
    local out = {}

    family(out, "flatnet_gateway_routes", "gauge", "Routes in the gateway's route table")
    sample(out, "flatnet_gateway_routes", "", count(#snap.names))

    family(out, "flatnet_gateway_backends", "gauge",
        "Backends of each route by the last health check (a backend not checked yet is in neither state)")
    for _, name in ipairs(snap.names) do
        local healthy, unhealthy = 0, 0
        for _, peer in ipairs(snap.routes[name].peers) do
            local status = peer_status(peer)
            if status == "up" then
                healthy = healthy + 1
            elseif status == "down" then
                unhealthy = unhealthy + 1
            end
        end
        local route = '{route="' .. esc(name) .. '",state="'
        sample(out, "flatnet_gateway_backends", route .. 'healthy"}', count(healthy))
        sample(out, "flatnet_gateway_backends", route .. 'unhealthy"}', count(unhealthy))
    end

    local requests, failures = {}, {}
    for _, key in ipairs(dict:get_keys(0)) do
        local class, route = key:match("^req (%d+) (.*)$")
        if class then
            requests[#requests + 1] = { route, class, dict:get(key) }
        else
            route = key:match("^fail (.*)$")
            if route then
                failures[#failures + 1] = { route, dict:get(key) }
            end
        end
    end

    table.sort(requests, function(x, y)
        return x[1] < y[1] or x[1] == y[1] and x[2] < y[2]
    end)
    table.sort(failures, function(x, y)
        return x[1] < y[1]
    end)

    family(out, "flatnet_gateway_requests_total", "counter",
        'Responses on the public side by route and status class (route="": no route matched)')
    for _, r in ipairs(requests) do
        sample(out, "flatnet_gateway_requests_total", '{route="' .. esc(r[1]) .. '",code="' .. r[2] .. 'xx"}',
            count(r[3]))
    end

    family(out, "flatnet_gateway_upstream_failures_total", "counter",
        "Requests no backend of the route answered (the gateway's 502/503/504 page)")
    for _, f in ipairs(failures) do
        sample(out, "flatnet_gateway_upstream_failures_total", '{route="' .. esc(f[1]) .. '"}', count(f[2]))
    end

    family(out, "flatnet_gateway_route_changes_total", "counter", "Admin API writes that changed the routes")
    sample(out, "flatnet_gateway_route_changes_total", "", count(dict:get("changes")))

    family(out, "flatnet_gateway_metrics_dropped_total", "counter",
        "Counts not stored because the gateway's metric series were at their cap")
    sample(out, "flatnet_gateway_metrics_dropped_total", "", count(dict:get("dropped")))

    family(out, "flatnet_gateway_up_since_seconds", "gauge",
        "Unix time the gateway started (its counters count from then; a reload keeps them)")
    sample(out, "flatnet_gateway_up_since_seconds", "", string.format("%.3f", dict:get("up_since") or 0))

    out[#out + 1] = ""
    return table.concat(out, "\n")
end

return M
