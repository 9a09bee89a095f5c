-- The gateway's own pages: the service index at /, "service X is not running" (502/503/504 from
-- a backend that does not answer) and "no such service" (404). Plain HTML, no scripts, so that
-- they read the same in any browser; the index refreshes itself every 10 s.

local state = require "flatnet.state"
local health = require "flatnet.health"
local metrics = require "flatnet.metrics"

local M = {}

local function esc(s)
    s = tostring(s)
    return (s:gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }))
end

local STYLE = [[
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;color:#222}
h1{font-size:1.5rem}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.4rem .6rem;border-bottom:1px solid #ddd}
.up{color:#176117;font-weight:bold}.down{color:#a11;font-weight:bold}.checking{color:#886400}
code{background:#f3f3f3;padding:0 .2rem}
]]

local function page(status, title, body, refresh)
    ngx.status = status
    ngx.header["Content-Type"] = "text/html; charset=utf-8"
    ngx.header["Cache-Control"] = "no-store"
    local head = '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        .. (refresh and '<meta http-equiv="refresh" content="10">' or "")
        .. "<title>" .. esc(title) .. "</title><style>" .. STYLE .. "</style></head>\n<body>\n"
    ngx.print(head, body, "\n</body></html>\n")
    return ngx.exit(status)
end

local function index_url()
    return "/"
end

-- Where a browser reaches a route from here.
local function links(route, host_no_port, scheme)
    local out = { '<a href="/' .. esc(route.name) .. '/">/' .. esc(route.name) .. "/</a>" }
    local domain = state.settings().domain
    local port = ngx.var.server_port
    local port_suffix = (port == "80" or port == nil) and "" or (":" .. port)
    if domain then
        local url = scheme .. "://" .. route.name .. "." .. domain .. port_suffix .. "/"
        out[#out + 1] = '<a href="' .. esc(url) .. '">' .. esc(url) .. "</a>"
    end
    if route.host then
        local url = scheme .. "://" .. route.host .. port_suffix .. "/"
        out[#out + 1] = '<a href="' .. esc(url) .. '">' .. esc(url) .. "</a>"
    end
    if route.port then
        local url = scheme .. "://" .. host_no_port .. ":" .. route.port .. "/"
        out[#out + 1] = '<a href="' .. esc(url) .. '">' .. esc(url) .. "</a>"
    end
    return table.concat(out, "<br>")
end

function M.index()
    local snap = state.snapshot()
    local host = ngx.var.host
    local scheme = ngx.var.scheme
    local rows = {}
    for _, name in ipairs(snap.names) do
        local r = snap.routes[name]
        local status = health.route_status(r)
        local backends = {}
        for _, peer in ipairs(r.peers) do
            backends[#backends + 1] = '<span class="' .. health.peer_status(peer) .. '">'
                .. esc(peer.key) .. "</span>"
        end
        rows[#rows + 1] = '<tr class="service" data-service="' .. esc(name) .. '" data-status="' .. status .. '">'
            .. '<td class="name">' .. esc(name) .. "</td>"
            .. '<td class="link">' .. links(r, host, scheme) .. "</td>"
            .. '<td class="status ' .. status .. '">' .. status .. "</td>"
            .. '<td class="backends">' .. table.concat(backends, " ") .. "</td>"
            .. '<td class="owner">' .. esc(r.owner or "") .. "</td></tr>"
    end
    local body
    if #rows == 0 then
        body = "<h1>Flatnet services</h1>\n<p id=\"empty\">No services yet. Start a container with "
            .. "<code>podman run --network flatnet ...</code> or push routes with "
            .. "<code>flatnet gateway sync routes.toml</code>.</p>"
    else
        body = "<h1>Flatnet services</h1>\n<table id=\"services\"><thead><tr><th>Service</th><th>Open</th>"
            .. "<th>Status</th><th>Backends</th><th>Owner</th></tr></thead>\n<tbody>\n"
            .. table.concat(rows, "\n") .. "\n</tbody></table>"
    end
    return page(200, "Flatnet services", body, true)
end

function M.unavailable()
    local name = ngx.var.flatnet_service or "?"
    -- "502" or "502, 504" after retries: the last try decides what we say.
    local tries = ngx.var.upstream_status or ""
    local status = tonumber(tries:match("(%d+)%s*$")) or 502
    local why
    if status == 504 then
        why = "did not answer in time"
    else
        why = "is not running"
        status = 503
    end
    metrics.count_response(name, status)
    metrics.count_upstream_failure(name)
    ngx.header["Retry-After"] = "10"
    local body = '<h1 id="unavailable">Service <code>' .. esc(name) .. "</code> " .. why .. "</h1>\n"
        .. "<p>The gateway knows this service, but none of its backends answered. If it is yours, "
        .. "start it again (<code>podman start ...</code>); otherwise ask the colleague who runs it.</p>\n"
        .. '<p><a href="' .. index_url() .. '">All services</a></p>'
    return page(status, "Service " .. name .. " " .. why, body, true)
end

function M.not_found()
    local what = ngx.var.flatnet_missing
    local name = ngx.var.flatnet_service
    local title
    if what == "service" then
        title = "No service called " .. name
    elseif what == "port" then
        title = "No service on port " .. name
    else
        title = "Nothing here"
    end
    local body = '<h1 id="not-found">' .. esc(title) .. "</h1>\n"
        .. '<p>See <a href="' .. index_url() .. '">the list of services</a> on this gateway.</p>'
    return page(404, title, body, false)
end

-- The location @flatnet_page: what router.route() asked for. Counted here (the router's header
-- filter does not run in this location); a missing service is counted under route "" so that
-- made-up names do not become metric series.
function M.answer()
    local page = ngx.var.flatnet_page
    if page == "index" then
        metrics.count_response("", 200)
        return M.index()
    elseif page == "slash" then
        metrics.count_response(ngx.var.flatnet_service, ngx.HTTP_MOVED_PERMANENTLY)
        return ngx.redirect(ngx.var.flatnet_uri, ngx.HTTP_MOVED_PERMANENTLY)
    end
    metrics.count_response("", 404)
    return M.not_found()
end

return M
