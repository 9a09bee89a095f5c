-- The route table: validation, storage in the shared dict, persistence to routes.json.
--
-- Theory of operation. The whole table lives in lua_shared_dict "flatnet_routes" as one JSON
-- document under key "state", with an integer "version" bumped on every change. Each worker keeps a
-- decoded copy (with lookup indexes) and rebuilds it when the version moves, so a request costs one
-- shared-dict read of a number. Changes come only from the admin API; they are made under a
-- shared-dict lock, validated in full first (a rejected call changes nothing), written to the state
-- file (temp file + rename) and only then published in the dict. init_by_lua loads the state file
-- when the dict is empty (a fresh start); on `nginx -s reload` the dict survives and wins.
--
-- The validation rules mirror flatnet/gateway/routes.py, whose patterns and limits are passed in
-- through init() so that both sides read the same constants.

local cjson = require "cjson.safe"
local metrics = require "flatnet.metrics"

local M = {}

local dict = ngx.shared.flatnet_routes
local settings = {}
local limits = {}
local modes = {}
local reserved = {}
local port_pool = {}
local token = nil

local cache_version = nil
local cache = nil

local function trim(s)
    return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

local function read_file(path)
    local f, err = io.open(path, "rb")
    if not f then
        return nil, err
    end
    local data = f:read("*a")
    f:close()
    return data
end

-- ---------------------------------------------------------------------------------------------
-- validation (mirrors routes.py)

local function is_array(t)
    if type(t) ~= "table" then
        return false
    end
    local n = 0
    for k in pairs(t) do
        if type(k) ~= "number" then
            return false
        end
        n = n + 1
    end
    for i = 1, n do
        if t[i] == nil then
            return false
        end
    end
    return true
end
M.is_array = is_array

local function matches(value, pattern)
    return type(value) == "string" and ngx.re.find(value, pattern, "jo") ~= nil
end

local function check_backend(value, field)
    if type(value) ~= "string" then
        return nil, field .. ": expected 'ip:port', got " .. tostring(value)
    end
    local a, b, c, d, port = value:match("^(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?):(%d+)$")
    if not a then
        return nil, field .. ": expected 'ip:port' like 10.87.1.2:80, got '" .. value .. "'"
    end
    local parts = { tonumber(a), tonumber(b), tonumber(c), tonumber(d) }
    for _, p in ipairs(parts) do
        if p > 255 then
            return nil, field .. ": expected an IPv4 address like 10.87.1.2, got '" .. value .. "'"
        end
    end
    local port_n = tonumber(port)
    if #port > 5 or port_n < 1 or port_n > 65535 then
        return nil, field .. ": expected a port in 1..65535, got '" .. value .. "'"
    end
    return table.concat(parts, ".") .. ":" .. port_n
end

local ROUTE_FIELDS = { name = true, backends = true, mode = true, port = true, owner = true, host = true }

-- A checked copy of route JSON `t`, or nil and a message naming the field.
function M.check_route(t)
    if type(t) ~= "table" or is_array(t) and next(t) ~= nil then
        return nil, "route: expected an object"
    end
    for k in pairs(t) do
        if not ROUTE_FIELDS[k] then
            return nil, tostring(k) .. ": unknown field"
        end
    end
    local r = {}
    if not matches(t.name, limits.name_pattern) then
        return nil, "name: expected a DNS label ([a-z0-9-], 1-63 characters), got " .. cjson.encode(t.name or cjson.null)
    end
    if reserved[t.name] then
        return nil, "name: '" .. t.name .. "' is reserved by the gateway"
    end
    r.name = t.name
    if not is_array(t.backends) then
        return nil, "backends: expected a list of 'ip:port'"
    end
    if #t.backends == 0 then
        return nil, "backends: at least one backend is needed"
    end
    if #t.backends > limits.max_backends then
        return nil, "backends: at most " .. limits.max_backends .. " backends"
    end
    r.backends = {}
    local seen = {}
    for i, b in ipairs(t.backends) do
        local canon, err = check_backend(b, "backends[" .. (i - 1) .. "]")
        if not canon then
            return nil, err
        end
        if seen[canon] then
            return nil, "backends: a backend is listed twice"
        end
        seen[canon] = true
        r.backends[i] = canon
    end
    local mode = t.mode
    if mode == nil or mode == cjson.null then
        mode = "strip"
    end
    if not modes[mode] then
        return nil, "mode: expected one of strip, pass"
    end
    r.mode = mode
    local port = t.port
    if port ~= nil and port ~= cjson.null then
        if type(port) ~= "number" or port ~= math.floor(port) or port < 1 or port > 65535 then
            return nil, "port: expected a port in 1..65535 or null"
        end
        if not port_pool[port] then
            return nil, "port: " .. port .. " is not one of the gateway's dedicated_ports"
        end
        r.port = port
    end
    local owner = t.owner
    if owner ~= nil and owner ~= cjson.null then
        if not matches(owner, limits.owner_pattern) then
            return nil, "owner: expected an owner name ([a-z0-9._-], 1-64 characters)"
        end
        r.owner = owner
    end
    local host = t.host
    if host ~= nil and host ~= cjson.null then
        if not matches(host, limits.host_pattern) or #host > limits.host_max_length then
            return nil, "host: expected a lower-case host name like web.example.lan"
        end
        r.host = host
    end
    return r
end

M.check_owner = function(owner)
    return matches(owner, limits.owner_pattern)
end

-- Clashes inside a whole table (name -> route): two routes on one port or one host name.
-- Returns nil or a message.
function M.check_table(routes)
    local ports, hosts = {}, {}
    for name, r in pairs(routes) do
        if r.port then
            if ports[r.port] and ports[r.port] ~= name then
                return "port " .. r.port .. " is already used by route '" .. ports[r.port] .. "'"
            end
            ports[r.port] = name
        end
        if r.host then
            if hosts[r.host] and hosts[r.host] ~= name then
                return "host " .. r.host .. " is already used by route '" .. hosts[r.host] .. "'"
            end
            hosts[r.host] = name
        end
    end
    return nil
end

-- ---------------------------------------------------------------------------------------------
-- JSON with explicit arrays (lua-cjson cannot tell an empty array from an empty object)

local function encode_route(r)
    local backends = {}
    for i, b in ipairs(r.backends) do
        backends[i] = cjson.encode(b)
    end
    return string.format(
        '{"name":%s,"backends":[%s],"mode":%s,"port":%s,"owner":%s,"host":%s}',
        cjson.encode(r.name),
        table.concat(backends, ","),
        cjson.encode(r.mode),
        r.port and tostring(r.port) or "null",
        r.owner and cjson.encode(r.owner) or "null",
        r.host and cjson.encode(r.host) or "null"
    )
end
M.encode_route = encode_route

local function sorted_names(routes)
    local names = {}
    for name in pairs(routes) do
        names[#names + 1] = name
    end
    table.sort(names)
    return names
end
M.sorted_names = sorted_names

-- {"routes": [...], "owners": {...}}: the state file format and the GET /api/v1/routes answer.
function M.encode_state(routes, owners)
    local items = {}
    for _, name in ipairs(sorted_names(routes)) do
        items[#items + 1] = encode_route(routes[name])
    end
    local owner_items = {}
    local owner_names = {}
    for o in pairs(owners) do
        owner_names[#owner_names + 1] = o
    end
    table.sort(owner_names)
    for _, o in ipairs(owner_names) do
        owner_items[#owner_items + 1] = cjson.encode(o) .. ":" .. string.format("%d", owners[o])
    end
    return '{"routes":[' .. table.concat(items, ",") .. '],"owners":{' .. table.concat(owner_items, ",") .. "}}"
end

-- Parse a state document back into (routes by name, owners). Invalid entries are skipped and
-- logged: a hand-edited file must not keep the gateway from starting.
local function decode_state(text, origin)
    local doc = cjson.decode(text)
    local routes, owners = {}, {}
    if type(doc) ~= "table" then
        ngx.log(ngx.ERR, "flatnet: ", origin, " is not a JSON object; starting with no routes")
        return routes, owners
    end
    if is_array(doc.routes) then
        for i, t in ipairs(doc.routes) do
            local r, err = M.check_route(t)
            if r then
                routes[r.name] = r
            else
                ngx.log(ngx.ERR, "flatnet: ", origin, " route ", i, " skipped: ", err)
            end
        end
    end
    if type(doc.owners) == "table" then
        for o, g in pairs(doc.owners) do
            if M.check_owner(o) and type(g) == "number" then
                owners[o] = g
            end
        end
    end
    return routes, owners
end

-- ---------------------------------------------------------------------------------------------
-- init (master, at start and at every reload)

function M.init(s)
    for k, v in pairs(s) do
        if v == cjson.null then
            s[k] = nil
        end
    end
    settings = s
    limits = s.limits
    for _, m in ipairs(limits.modes) do
        modes[m] = true
    end
    for _, n in ipairs(limits.reserved_names) do
        reserved[n] = true
    end
    for _, p in ipairs(s.dedicated_ports) do
        port_pool[p] = true
    end
    local text, err = read_file(s.token_file)
    if text and #trim(text) >= 16 then
        token = trim(text)
    else
        token = nil
        ngx.log(ngx.ERR, "flatnet: admin token file ", s.token_file, " unreadable or shorter than 16 characters (",
            tostring(err), "); the admin API refuses every call")
    end
    if dict:get("state") == nil then
        local routes, owners = {}, {}
        local saved = read_file(s.state_file)
        if saved then
            routes, owners = decode_state(saved, s.state_file)
        end
        local ok, set_err = dict:set("state", M.encode_state(routes, owners))
        if not ok then
            ngx.log(ngx.ERR, "flatnet: cannot store routes in the shared dict: ", set_err)
        end
        dict:set("version", 1)
    end
end

function M.settings()
    return settings
end

function M.token()
    return token
end

function M.port_pool()
    return port_pool
end

-- ---------------------------------------------------------------------------------------------
-- the per-worker view

-- The current table: {routes = name->route, owners, by_host = host->route, by_port = port->route,
-- names = sorted list}. Each route carries `peers` ({ip, port, key}) and `prefix` ("/name").
function M.snapshot()
    local version = dict:get("version")
    if cache and version == cache_version then
        return cache
    end
    local routes, owners = decode_state(dict:get("state") or "{}", "shared dict")
    local snap = { routes = routes, owners = owners, by_host = {}, by_port = {}, names = sorted_names(routes) }
    local domain = settings.domain
    for name, r in pairs(routes) do
        r.prefix = "/" .. name
        r.peers = {}
        r.authorities = {}
        for i, b in ipairs(r.backends) do
            local ip, port = b:match("^(.+):(%d+)$")
            r.peers[i] = { ip = ip, port = tonumber(port), key = b }
            r.authorities[b] = true
            if port == "80" then
                r.authorities[ip] = true
            end
        end
        if domain then
            snap.by_host[name .. "." .. domain] = r
        end
        if r.port then
            snap.by_port[r.port] = r
        end
    end
    for _, r in pairs(routes) do
        if r.host then
            snap.by_host[r.host] = r
        end
    end
    cache, cache_version = snap, version
    return snap
end

-- ---------------------------------------------------------------------------------------------
-- changes (admin API only)

local function lock()
    local deadline = ngx.now() + 5
    while true do
        local ok = dict:add("lock", ngx.worker.pid(), 10)
        if ok then
            return true
        end
        if ngx.now() > deadline then
            return false
        end
        ngx.sleep(0.002)
    end
end

local function unlock()
    dict:delete("lock")
end

local function write_state_file(text)
    local path = settings.state_file
    local tmp = path .. ".tmp"
    local f, err = io.open(tmp, "wb")
    if not f then
        return nil, "cannot write " .. tmp .. ": " .. tostring(err)
    end
    local ok, werr = f:write(text, "\n")
    f:close()
    if not ok then
        os.remove(tmp)
        return nil, "cannot write " .. tmp .. ": " .. tostring(werr)
    end
    local renamed, rerr = os.rename(tmp, path)
    if not renamed then
        -- Windows cannot rename over an existing file.
        os.remove(path)
        renamed, rerr = os.rename(tmp, path)
    end
    if not renamed then
        return nil, "cannot replace " .. path .. ": " .. tostring(rerr)
    end
    return true
end

-- Run `change(routes, owners)` on a private copy of the table under the lock. `change` returns
-- nil on success or (status, message) to reject; on success the new table is persisted and
-- published. Returns nil or (status, message).
function M.update(change)
    if not lock() then
        return 503, "the route table is busy, try again"
    end
    local routes, owners = decode_state(dict:get("state") or "{}", "shared dict")
    local routes_before = M.encode_state(routes, {})
    local status, message = change(routes, owners)
    if status then
        unlock()
        return status, message
    end
    local clash = M.check_table(routes)
    if clash then
        unlock()
        return 409, clash
    end
    local text = M.encode_state(routes, owners)
    local ok, err = write_state_file(text)
    if not ok then
        unlock()
        ngx.log(ngx.ERR, "flatnet: ", err)
        return 500, err
    end
    local stored, set_err = dict:set("state", text)
    if not stored then
        unlock()
        return 500, "cannot store routes in the shared dict: " .. tostring(set_err)
    end
    dict:incr("version", 1, 0)
    unlock()
    if M.encode_state(routes, {}) ~= routes_before then -- not a sync that only moved a generation
        metrics.count_route_change()
    end
    return nil
end

return M
