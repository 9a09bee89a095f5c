-- The admin API (see docs/admin-api.md). JSON in and out, bearer token, and a strict rule: a
-- rejected call changes nothing (state.update validates a private copy before publishing it).
--
--   GET    /api/v1/routes          -> {"routes": [...], "owners": {owner: generation}}
--   GET    /api/v1/routes/{name}   -> route | 404
--   PUT    /api/v1/routes/{name}   -> {"ok": true}            body: route
--   DELETE /api/v1/routes/{name}   -> {"ok": true} | 404
--   POST   /api/v1/sync            -> {"ok": true, ...}       body: {"owner", "generation", "routes"}
--   GET    /metrics                -> Prometheus text format (see metrics.lua)
--
-- Errors: 400 bad input (message names the field), 401 no/incorrect token, 404, 405, 409 conflict
-- (stale generation, a name/port/host held by another route or owner), 500 cannot persist.

local cjson = require "cjson.safe"
local state = require "flatnet.state"
local health = require "flatnet.health"
local metrics = require "flatnet.metrics"

local M = {}

local function reply(status, body)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Cache-Control"] = "no-store"
    ngx.print(body, "\n")
    return ngx.exit(status)
end

local function fail(status, message)
    return reply(status, '{"error":' .. cjson.encode(message) .. "}")
end

-- Compare without stopping at the first difference, so timing does not reveal a token prefix.
local function same_secret(a, b)
    if #a ~= #b then
        return false
    end
    local diff = 0
    for i = 1, #a do
        diff = bit.bor(diff, bit.bxor(a:byte(i), b:byte(i)))
    end
    return diff == 0
end

local function authorized()
    local token = state.token()
    if not token then
        return false
    end
    local header = ngx.var.http_authorization
    if type(header) ~= "string" then
        return false
    end
    local given = header:match("^[Bb]earer%s+(%S+)%s*$")
    return given ~= nil and same_secret(given, token)
end

local function read_json()
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if body == nil then
        if ngx.req.get_body_file() then
            return nil, "request body too large"
        end
        return nil, "a JSON body is required"
    end
    local doc, err = cjson.decode(body)
    if doc == nil then
        return nil, "body is not valid JSON: " .. tostring(err)
    end
    return doc
end

local function list()
    local snap = state.snapshot()
    return reply(200, state.encode_state(snap.routes, snap.owners))
end

local function get(name)
    local route = state.snapshot().routes[name]
    if not route then
        return fail(404, "no route called " .. name)
    end
    return reply(200, state.encode_route(route))
end

local function put(name)
    local doc, err = read_json()
    if not doc then
        return fail(400, err)
    end
    if type(doc) == "table" and not state.is_array(doc) and doc.name == nil then
        doc.name = name
    end
    local route, problem = state.check_route(doc)
    if not route then
        return fail(400, problem)
    end
    if route.name ~= name then
        return fail(400, "name: the body names '" .. route.name .. "' but the URL names '" .. name .. "'")
    end
    local status, message = state.update(function(routes)
        routes[name] = route
    end)
    if status then
        return fail(status, message)
    end
    health.check_soon()
    return reply(200, '{"ok":true}')
end

local function delete(name)
    local status, message = state.update(function(routes)
        if not routes[name] then
            return 404, "no route called " .. name
        end
        routes[name] = nil
    end)
    if status then
        return fail(status, message)
    end
    return reply(200, '{"ok":true}')
end

local function sync()
    local doc, err = read_json()
    if not doc then
        return fail(400, err)
    end
    if type(doc) ~= "table" or state.is_array(doc) and next(doc) ~= nil then
        return fail(400, "body: expected an object with owner, generation and routes")
    end
    for k in pairs(doc) do
        if k ~= "owner" and k ~= "generation" and k ~= "routes" then
            return fail(400, tostring(k) .. ": unknown field")
        end
    end
    local owner, generation = doc.owner, doc.generation
    if not state.check_owner(owner) then
        return fail(400, "owner: expected an owner name ([a-z0-9._-], 1-64 characters)")
    end
    if type(generation) ~= "number" or generation ~= math.floor(generation) or generation < 0
        or generation > 9007199254740991 then
        return fail(400, "generation: expected a non-negative integer")
    end
    if not state.is_array(doc.routes) then
        return fail(400, "routes: expected a list of routes")
    end
    local incoming = {}
    for i, t in ipairs(doc.routes) do
        if type(t) == "table" and (t.owner == nil or t.owner == cjson.null) then
            t.owner = owner
        end
        local route, problem = state.check_route(t)
        if not route then
            return fail(400, "routes[" .. (i - 1) .. "]." .. problem)
        end
        if route.owner ~= owner then
            return fail(400, "routes[" .. (i - 1) .. "].owner: '" .. route.owner .. "' in a sync for '" .. owner .. "'")
        end
        if incoming[route.name] then
            return fail(400, "routes[" .. (i - 1) .. "].name: '" .. route.name .. "' is listed twice")
        end
        incoming[route.name] = route
    end
    local added, removed = 0, 0
    local status, message = state.update(function(routes, owners)
        local stored = owners[owner]
        if stored and generation < stored then
            return 409, "generation " .. string.format("%d", generation) .. " is older than the stored "
                .. string.format("%d", stored) .. " for owner " .. owner
        end
        for name, route in pairs(incoming) do
            local held = routes[name]
            if held and held.owner ~= owner then
                return 409, "route '" .. name .. "' belongs to " .. (held.owner and ("owner " .. held.owner) or "no owner (set by hand)")
            end
        end
        for name, route in pairs(routes) do
            if route.owner == owner then
                routes[name] = nil
                removed = removed + 1
            end
        end
        for name, route in pairs(incoming) do
            routes[name] = route
            added = added + 1
        end
        owners[owner] = generation
    end)
    if status then
        return fail(status, message)
    end
    health.check_soon()
    return reply(200, string.format('{"ok":true,"owner":%s,"generation":%d,"routes":%d,"replaced":%d}',
        cjson.encode(owner), generation, added, removed))
end

local function refuse()
    ngx.header["WWW-Authenticate"] = 'Bearer realm="flatnet-gateway"'
    return fail(401, "missing or incorrect bearer token")
end

function M.handle()
    if not authorized() then
        return refuse()
    end
    local method = ngx.req.get_method()
    local uri = ngx.var.uri
    if uri == "/api/v1/routes" then
        if method == "GET" then
            return list()
        end
        return fail(405, "use GET on /api/v1/routes")
    end
    if uri == "/api/v1/sync" then
        if method == "POST" then
            return sync()
        end
        return fail(405, "use POST on /api/v1/sync")
    end
    local name = uri:match("^/api/v1/routes/([^/]+)$")
    if name then
        if not ngx.re.find(name, state.settings().limits.name_pattern, "jo") then
            return fail(400, "name: expected a DNS label ([a-z0-9-], 1-63 characters), got '" .. name .. "'")
        end
        if method == "GET" then
            return get(name)
        elseif method == "PUT" then
            return put(name)
        elseif method == "DELETE" then
            return delete(name)
        end
        return fail(405, "use GET, PUT or DELETE on /api/v1/routes/{name}")
    end
    return fail(404, "no such endpoint; see /api/v1/routes and /api/v1/sync")
end

-- location = /metrics: this worker's pending counts first, then the page from the shared dict.
function M.metrics()
    if not authorized() then
        return refuse()
    end
    local method = ngx.req.get_method()
    if method ~= "GET" and method ~= "HEAD" then
        return fail(405, "use GET on /metrics")
    end
    metrics.flush()
    ngx.status = 200
    ngx.header["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    ngx.header["Cache-Control"] = "no-store"
    ngx.print(metrics.render(state.snapshot(), health.peer_status))
    return ngx.exit(200)
end

function M.too_large()
    return fail(400, "request body too large (limit " .. state.settings().admin_max_body .. " bytes)")
end

return M
