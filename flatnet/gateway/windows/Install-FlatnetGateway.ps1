<#
.SYNOPSIS
    Flatnet gateway on a Windows host whose WSL2 runs in NAT mode (see docs/gateway.md).

.DESCRIPTION
    -Install (run once, as Administrator):
        * copies the config rendered by `flatnet gateway render --target windows` into $GatewayDir\nginx
        * creates the admin token file, readable by Administrators and SYSTEM only
        * opens the public port to the LAN (Windows Firewall), and nothing else
        * registers a scheduled task that runs -Update at every start-up
    -Update (at start-up, and whenever WSL restarts):
        * finds the WSL2 VM's current address (it changes at every restart in NAT mode)
        * routes the Flatnet range (10.87.0.0/16) to it
        * binds the admin API to the host's address on the WSL network, allows only that network
        * starts OpenResty, or reloads it if it runs

    Nothing here downloads anything. Read it before running it; it is short on purpose.

.EXAMPLE
    # in WSL: flatnet gateway render --config gateway.toml --target windows --out /mnt/c/flatnet/rendered
    .\Install-FlatnetGateway.ps1 -Install -RenderedDir C:\flatnet\rendered -Distro Debian
    .\Install-FlatnetGateway.ps1 -Update -Distro Debian
#>
[CmdletBinding(DefaultParameterSetName = "Update")]
param(
    [Parameter(ParameterSetName = "Install", Mandatory)] [switch] $Install,
    [Parameter(ParameterSetName = "Install", Mandatory)] [string] $RenderedDir,
    [Parameter(ParameterSetName = "Update")] [switch] $Update,
    [string] $Distro = "Debian",
    [string] $OpenRestyDir = "C:\openresty",
    [string] $GatewayDir = "C:\flatnet\gateway",
    [string] $FlatnetRange = "10.87.0.0/16",
    [int] $HttpPort = 80,
    [int] $AdminPort = 8081
)

Set-StrictMode -Version Latest
$ErrorActionPreference = "Stop"

$Nginx = Join-Path $OpenRestyDir "nginx.exe"
$Prefix = Join-Path $GatewayDir "nginx"
$Conf = Join-Path $Prefix "conf\nginx.conf"
# nginx.exe arguments with forward slashes: a trailing backslash before a quote would escape it.
$PrefixArg = ($Prefix -replace '\\', '/') + '/'
$ConfArg = $Conf -replace '\\', '/'
$TokenFile = Join-Path $GatewayDir "admin.token"
$TaskName = "Flatnet gateway"

function Assert-Admin {
    $id = [Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()
    if (-not $id.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
        throw "Run this from an elevated PowerShell (Run as Administrator)."
    }
}

function Get-WslAddress {
    # The first IPv4 address of the distribution's eth0, e.g. 172.29.167.42.
    $out = & wsl.exe -d $Distro -- hostname -I
    if ($LASTEXITCODE -ne 0) { throw "wsl.exe -d $Distro failed; is the distribution name right?" }
    $addr = ($out -split "\s+" | Where-Object { $_ -match '^\d+\.\d+\.\d+\.\d+$' } | Select-Object -First 1)
    if (-not $addr) { throw "no IPv4 address in 'hostname -I' of $Distro : $out" }
    return $addr
}

function Set-FlatnetRoute([string] $WslAddress) {
    # Replace any old route: the VM's address from the last boot is gone.
    Get-NetRoute -DestinationPrefix $FlatnetRange -ErrorAction SilentlyContinue |
        Remove-NetRoute -Confirm:$false
    $via = Find-NetRoute -RemoteIPAddress $WslAddress | Where-Object { $_ -is [CimInstance] -and $_.InterfaceIndex } |
        Select-Object -First 1
    New-NetRoute -DestinationPrefix $FlatnetRange -InterfaceIndex $via.InterfaceIndex -NextHop $WslAddress `
        -PolicyStore ActiveStore | Out-Null
    # The host's own address on the WSL network and that network's prefix (e.g. 172.29.160.1/20).
    $local = Get-NetIPAddress -InterfaceIndex $via.InterfaceIndex -AddressFamily IPv4 | Select-Object -First 1
    return $local
}

function Write-AdminListen($Local) {
    # Same shape as conf/flatnet_admin_listen.conf from `flatnet gateway render`.
    $bytes = [Net.IPAddress]::Parse($Local.IPAddress).GetAddressBytes()
    [Array]::Reverse($bytes)
    $mask = [uint32](([uint64]1 -shl 32) - ([uint64]1 -shl (32 - $Local.PrefixLength)))
    $net = [BitConverter]::GetBytes([BitConverter]::ToUInt32($bytes, 0) -band $mask)
    [Array]::Reverse($net)
    $network = "{0}/{1}" -f ([Net.IPAddress]::new($net)).ToString(), $Local.PrefixLength
    $text = @(
        "# written by Install-FlatnetGateway.ps1 -Update on $(Get-Date -Format s)"
        "listen 127.0.0.1:$AdminPort;"
        "listen $($Local.IPAddress):$AdminPort;"
        "allow 127.0.0.0/8;"
        "allow $network;"
    ) -join "`n"
    [IO.File]::WriteAllText((Join-Path $Prefix "conf\flatnet_admin_listen.conf"), $text + "`n")
    return $network
}

function Start-OrReload {
    & $Nginx -p $PrefixArg -c $ConfArg -t -q
    if ($LASTEXITCODE -ne 0) { throw "nginx -t rejects $Conf" }
    $running = Get-Process -Name nginx -ErrorAction SilentlyContinue |
        Where-Object { $_.Path -eq (Resolve-Path $Nginx).Path }
    if ($running) {
        & $Nginx -p $PrefixArg -c $ConfArg -s reload
    } else {
        Start-Process -FilePath $Nginx -ArgumentList @("-p", $PrefixArg, "-c", $ConfArg) `
            -WorkingDirectory $OpenRestyDir -WindowStyle Hidden
    }
}

Assert-Admin

if ($Install) {
    if (-not (Test-Path $Nginx)) { throw "OpenResty not found at $Nginx (unzip the Windows build there)." }
    New-Item -ItemType Directory -Force -Path $Prefix, "$Prefix\logs", "$Prefix\tmp" | Out-Null
    Copy-Item -Recurse -Force -Path (Join-Path $RenderedDir "*") -Destination $Prefix
    if (-not (Test-Path $TokenFile)) {
        $rng = [Security.Cryptography.RandomNumberGenerator]::Create()
        $raw = New-Object byte[] 32
        $rng.GetBytes($raw)
        $token = [Convert]::ToBase64String($raw).TrimEnd("=").Replace("+", "-").Replace("/", "_")
        [IO.File]::WriteAllText($TokenFile, $token + "`n")
    }
    # Token: Administrators and SYSTEM only, no inherited access.
    & icacls.exe $TokenFile /inheritance:r /grant:r "*S-1-5-32-544:R" "*S-1-5-18:R" | Out-Null
    # The LAN may reach the public port; the admin port gets no inbound rule (blocked by default),
    # and nginx binds it only on loopback and the WSL network anyway.
    $rule = "Flatnet gateway (HTTP $HttpPort)"
    Get-NetFirewallRule -DisplayName $rule -ErrorAction SilentlyContinue | Remove-NetFirewallRule
    New-NetFirewallRule -DisplayName $rule -Direction Inbound -Protocol TCP -LocalPort $HttpPort `
        -Action Allow -Profile Domain, Private | Out-Null
    $adminRule = "Flatnet gateway admin API from WSL ($AdminPort)"
    Get-NetFirewallRule -DisplayName $adminRule -ErrorAction SilentlyContinue | Remove-NetFirewallRule
    New-NetFirewallRule -DisplayName $adminRule -Direction Inbound -Protocol TCP -LocalPort $AdminPort `
        -Action Allow -InterfaceAlias "vEthernet (WSL*" | Out-Null
    $action = New-ScheduledTaskAction -Execute "powershell.exe" -Argument (
        "-NoProfile -ExecutionPolicy Bypass -File `"$PSCommandPath`" -Update -Distro $Distro " +
        "-OpenRestyDir `"$OpenRestyDir`" -GatewayDir `"$GatewayDir`" -AdminPort $AdminPort")
    $trigger = New-ScheduledTaskTrigger -AtStartup
    Register-ScheduledTask -TaskName $TaskName -Action $action -Trigger $trigger -User "SYSTEM" `
        -RunLevel Highest -Force | Out-Null
    Write-Host "Installed. Token: $TokenFile (copy it into WSL for flatnet-node / flatnet gateway sync)."
}

$wsl = Get-WslAddress
$local = Set-FlatnetRoute $wsl
$network = Write-AdminListen $local
Start-OrReload
Write-Host "Flatnet range $FlatnetRange -> $wsl; admin API on $($local.IPAddress):$AdminPort (allowed: $network)"
Write-Host "From the LAN: http://$env:COMPUTERNAME/"
