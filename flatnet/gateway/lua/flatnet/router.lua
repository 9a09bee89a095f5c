-- Choosing a route for a request (rewrite phase), a backend for it (balancer phase), and fixing
-- what a strip-mode app sends back (header filter, which also counts every proxied response).
--
-- route() runs in set_by_lua (no coroutine, no yielding: only shared-dict reads and string work).
-- A request finds its route in this order:
--   1. it arrived on a dedicated port      -> the route holding that port (whole URI passed)
--   2. its Host is <name>.<domain> or a route's `host` -> that route (whole URI passed)
--   3. its path is / -> the service index
--   4. its path starts with /<name>        -> that route: "strip" removes /<name>, "pass" keeps it
-- The raw $request_uri is cut, never the decoded $uri, so the app sees exactly what the client sent.

local balancer = require "ngx.balancer"
local state = require "flatnet.state"
local metrics = require "flatnet.metrics"

local M = {}

local health = ngx.shared.flatnet_health
local count_response = metrics.count_response
local rr = {} -- per-worker round-robin position by route name

-- What the gateway answers itself (pages.answer reads it back from $flatnet_page).
local function not_found(kind)
    ngx.var.flatnet_missing = kind
    return "not-found"
end

local function use(route, upstream_uri, prefix, kind)
    local ctx = ngx.ctx
    ctx.flatnet_route = route
    ctx.flatnet_kind = kind
    ngx.var.flatnet_service = route.name
    ngx.var.flatnet_uri = upstream_uri
    if prefix then
        ngx.var.flatnet_prefix = prefix
    end
    return ""
end

-- In set_by_lua: "" to proxy (route in ngx.ctx, $flatnet_uri set), else the page to answer.
function M.route()
    local snap = state.snapshot()
    local request_uri = ngx.var.request_uri

    local pool = state.port_pool()
    local port = next(pool) and tonumber(ngx.var.server_port)
    if port and pool[port] then
        local route = snap.by_port[port]
        if not route then
            ngx.var.flatnet_service = tostring(port)
            return not_found("port")
        end
        return use(route, request_uri, nil, "port")
    end

    local route = next(snap.by_host) and snap.by_host[ngx.var.host]
    if route then
        return use(route, request_uri, nil, "host")
    end

    local name, rest = request_uri:match("^/([^/?]+)(.*)$")
    if not name then
        if ngx.var.uri == "/" then
            return "index"
        end
        return not_found("path")
    end
    route = snap.routes[name]
    if not route then
        ngx.var.flatnet_service = name
        return not_found("service")
    end
    if route.mode == "pass" then
        return use(route, request_uri, nil, "path")
    end
    if rest == "" or rest:byte(1) == 63 then -- "/web" or "/web?x": the app's root is "/web/"
        ngx.var.flatnet_service = name -- the redirect is counted for this route
        ngx.var.flatnet_uri = "/" .. name .. "/" .. rest
        return "slash"
    end
    return use(route, rest, route.prefix, "path")
end

-- Round-robin from a per-worker position; the first try prefers a backend the health check has
-- not seen down. Later tries (after a connect failure) walk on to the next backend.
function M.balance()
    local ctx = ngx.ctx
    local route = ctx.flatnet_route
    local peers = route.peers
    local n = #peers
    local index = ctx.flatnet_peer
    if n == 1 then
        index = 1 -- nothing to choose; the common case stays cheap
    elseif index == nil then
        local start = (rr[route.name] or 0) % n + 1
        rr[route.name] = start
        index = start
        for step = 0, n - 1 do
            local i = (start + step - 1) % n + 1
            if health:get(peers[i].key) ~= 0 then
                index = i
                break
            end
        end
        balancer.set_more_tries(n - 1)
        ctx.flatnet_peer = index
    else
        index = index % n + 1
        ctx.flatnet_peer = index
    end
    local peer = peers[index]
    local ok, err = balancer.set_current_peer(peer.ip, peer.port)
    if not ok then
        ngx.log(ngx.ERR, "flatnet: cannot use backend ", peer.key, ": ", err)
        return ngx.exit(502)
    end
end

-- ---------------------------------------------------------------------------------------------
-- strip mode: put redirects and cookie paths back under the prefix

local function under_prefix(path, prefix)
    if path == prefix or path:sub(1, #prefix + 1) == prefix .. "/" then
        return path -- the app already knows its prefix (it read X-Forwarded-Prefix)
    end
    if path == "/" then
        return prefix .. "/"
    end
    return prefix .. path
end

-- Location values: "/x" -> "/web/x"; "http://<our host or a backend>/x" -> "http://<our host>/web/x"
-- (`backends`: the set of "ip:port" and, for port 80, "ip" of the route's backends).
-- Relative references ("x", "../x") already resolve under the prefix and are left alone.
function M.rewrite_location(location, prefix, host, backends)
    if location:sub(1, 2) == "//" then
        local authority, path = location:match("^//([^/?#]*)(.*)$")
        if authority and (authority:lower() == host or backends[authority]) then
            return "//" .. host .. under_prefix(path ~= "" and path or "/", prefix)
        end
        return location
    end
    if location:byte(1) == 47 then -- "/"
        return under_prefix(location, prefix)
    end
    local scheme, authority, path = location:match("^([%a][%w+.-]*)://([^/?#]*)(.*)$")
    if scheme and (authority:lower() == host or backends[authority]) then
        if path == "" then
            path = "/"
        end
        return scheme .. "://" .. host .. under_prefix(path, prefix)
    end
    return location
end

function M.rewrite_cookie(cookie, prefix)
    local replaced = cookie:gsub("([;%s][Pp][Aa][Tt][Hh]%s*=%s*)(/[^;]*)", function(attr, path)
        if path == "/" then
            return attr .. prefix
        end
        return attr .. under_prefix(path, prefix)
    end)
    return replaced
end

-- Every response of the proxying location passes here (the pages the gateway writes itself go
-- through an internal redirect to another location: pages.lua counts those).
function M.header_filter()
    local ctx = ngx.ctx
    local route = ctx.flatnet_route
    count_response(route and route.name or "", ngx.status)
    if not route or ctx.flatnet_kind ~= "path" or route.mode ~= "strip" then
        return
    end
    local prefix = route.prefix
    local headers = ngx.header
    local location = headers["Location"]
    if location then
        local host = ngx.var.http_host or ngx.var.host
        headers["Location"] = M.rewrite_location(location, prefix, host:lower(), route.authorities)
    end
    local cookies = headers["Set-Cookie"]
    if cookies then
        if type(cookies) == "table" then
            local out = {}
            for i, c in ipairs(cookies) do
                out[i] = M.rewrite_cookie(c, prefix)
            end
            headers["Set-Cookie"] = out
        else
            headers["Set-Cookie"] = M.rewrite_cookie(cookies, prefix)
        end
    end
end

return M
