-- Do the backends answer? Worker 0 tries a TCP connect to every backend every health_interval
-- seconds (and at once after a route change) and writes 1 (up) or 0 (down) into the shared dict
-- "flatnet_health" keyed by "ip:port". A key that is missing means "not checked yet". The results
-- feed the index page and let the balancer try a live backend first.

local state = require "flatnet.state"

local M = {}

local health = ngx.shared.flatnet_health
local CONNECT_TIMEOUT_MS = 1000

local function probe(key, ip, port, ttl)
    local sock = ngx.socket.tcp()
    sock:settimeout(CONNECT_TIMEOUT_MS)
    local ok = sock:connect(ip, port)
    if ok then
        sock:close()
    end
    health:set(key, ok and 1 or 0, ttl)
end

function M.check_once(premature)
    if premature then
        return
    end
    local snap = state.snapshot()
    local interval = state.settings().health_interval
    local ttl = interval * 3 + 5
    local threads, seen = {}, {}
    for _, name in ipairs(snap.names) do
        for _, peer in ipairs(snap.routes[name].peers) do
            if not seen[peer.key] then
                seen[peer.key] = true
                threads[#threads + 1] = ngx.thread.spawn(probe, peer.key, peer.ip, peer.port, ttl)
            end
        end
    end
    for _, t in ipairs(threads) do
        ngx.thread.wait(t)
    end
end

function M.check_soon()
    local ok, err = ngx.timer.at(0, M.check_once)
    if not ok then
        ngx.log(ngx.WARN, "flatnet: cannot schedule a health check: ", err)
    end
end

-- Worker 0 only: one prober is enough, and the results are shared.
function M.start()
    if ngx.worker.id() ~= 0 then
        return
    end
    local interval = state.settings().health_interval
    M.check_soon()
    local ok, err = ngx.timer.every(interval, M.check_once)
    if not ok then
        ngx.log(ngx.ERR, "flatnet: cannot start health checks: ", err)
    end
end

-- "up" if any backend answered, "down" if all were checked and none did, else "checking".
function M.route_status(route)
    local unknown = false
    for _, peer in ipairs(route.peers) do
        local v = health:get(peer.key)
        if v == 1 then
            return "up"
        elseif v == nil then
            unknown = true
        end
    end
    return unknown and "checking" or "down"
end

function M.peer_status(peer)
    local v = health:get(peer.key)
    if v == 1 then
        return "up"
    elseif v == 0 then
        return "down"
    end
    return "checking"
end

return M
