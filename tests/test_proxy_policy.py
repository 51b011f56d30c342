"""Policy parsing, matching and precedence (SPEC §5, §10) — pure, no sockets."""

import ipaddress

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sandbox.proxy.policy import (
    BadHost, Decision, Facts, Policy, Route, Target, decide, host_from_header, match, parse_host, parse_target,
)

pytestmark = pytest.mark.timeout(60)

H_HTTP = object()


def facts(host, ip="93.184.216.34", port=80, scheme="http"):
    return Facts.make(host, ip, port, scheme)


def targets(*texts):
    return tuple(parse_target(t) for t in texts)


def route(text, handler, schemes=("http",)):
    return Route(parse_target(text), handler, frozenset(schemes))


# -- parsing -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, kind, pattern, port", [
    ("example.com", "host", "example.com", None),
    ("Example.COM.", "host", "example.com", None),
    ("10.0.0.1.", "ip", "10.0.0.1", None),
    ("example.com:8080", "host", "example.com", 8080),
    ("*.example.com", "glob", "*.example.com", None),
    ("google.*", "glob", "google.*", None),
    ("*", "glob", "*", None),
    ("*:8443", "glob", "*", 8443),
    ("my_svc.internal", "host", "my_svc.internal", None),
    ("localhost", "host", "localhost", None),
    ("10.1.2.3", "ip", "10.1.2.3", None),
    ("10.1.2.3:443", "ip", "10.1.2.3", 443),
    ("10.0.0.0/8", "cidr", "10.0.0.0/8", None),
    ("10.0.0.0/8:80", "cidr", "10.0.0.0/8", 80),
    ("10.1.2.3/8", "cidr", "10.0.0.0/8", None),
    ("2001:db8::1", "ip", "2001:db8::1", None),
    ("::1:80", "ip", "::1:80", None),  # bare IPv6: no port
    ("[2001:db8::1]:8080", "ip", "2001:db8::1", 8080),
    ("[2001:db8::1]", "ip", "2001:db8::1", None),
    ("2001:db8::/32", "cidr", "2001:db8::/32", None),
    ("[2001:db8::/32]:443", "cidr", "2001:db8::/32", 443),
    ("2001:DB8::A", "ip", "2001:db8::a", None),
    ("a:1", "host", "a", 1),
    ("a:65535", "host", "a", 65535),
])
def test_parse_target(text, kind, pattern, port):
    t = parse_target(text)
    assert (t.kind, t.pattern, t.port) == (kind, pattern, port)


@pytest.mark.parametrize("text", [
    "", " ", " example.com", "example.com ", "exa mple.com", "http://example.com", "example.com/path",
    "example.com:", "example.com:0", "example.com:65536", "example.com:http", "example.com:-1",
    "example..com", ".example.com", "a.b:1:2", "[2001:db8::1", "[2001:db8::1]8080",
    "[2001:db8::1]:", "[example.com]:80", "[10.0.0.1]:80", "10.0.0.0/33", "2001:db8::/129",
    "10.0.0.0/x", "héllo.com", "a" * 64 + ".com", ".", "1.2.3.4:80:80", "exa!mple.com",
    "2001:db8::zz", ":::", "[]:80",
])
def test_parse_target_malformed(text):
    with pytest.raises(ValueError):
        parse_target(text)


@pytest.mark.parametrize("bad", [None, 1, b"example.com", ["x"]])
def test_parse_target_type(bad):
    with pytest.raises(TypeError):
        parse_target(bad)


def test_target_str_round_trip():
    for text in ["example.com", "a.b:81", "[2001:db8::1]:8080", "10.0.0.0/8", "*.x.com:1"]:
        assert str(parse_target(text)) == text
        assert parse_target(str(parse_target(text))) == parse_target(text)


@pytest.mark.parametrize("value, host", [
    ("Example.com", "example.com"), ("example.com:8080", "example.com"), ("example.com.", "example.com"),
    ("[::1]:80", "::1"), ("[::1]", "::1"), ("::1", "::1"), ("1.2.3.4:80", "1.2.3.4"), ("", None), (None, None),
])
def test_host_from_header(value, host):
    assert host_from_header(value) == host


# -- matching ----------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, host, expected", [
    # The SPEC §5 examples, verbatim.
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),
    ("google.*", "google.co.uk", True),
    ("api.*.com", "api.stripe.co.uk", False),
    # More of the same rules.
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "evil-example.com", False),
    ("*.example.com", "a.example.com.evil", False),
    ("api.*.com", "api.stripe.com", True),
    ("api.*.com", "api.a.b.com", True),
    ("google.*", "google.com", True),
    ("google.*", "google", False),
    ("google.*", "notgoogle.com", False),
    ("*", "anything.at.all", True),
    ("a*c", "abc", True),
    ("a*c", "ac", True),
    ("a*c", "abd", False),
    ("example.com", "EXAMPLE.com", True),
    ("Example.Com.", "example.com", True),
    ("example.com", "example.com.", True),
    ("example.com", "www.example.com", False),
    ("*.EXAMPLE.com", "A.Example.COM.", True),
])
def test_glob_matching(pattern, host, expected):
    assert match(parse_target(pattern), facts(host)) is expected


def test_name_rules_do_not_match_ip_literals_but_star_does():
    f = facts("10.0.0.1", ip="10.0.0.1")
    assert not match(parse_target("*.0.0.1"), f)
    assert match(parse_target("*"), f)
    assert match(parse_target("*"), facts(None))
    assert not match(parse_target("example.com"), facts(None))


def test_ip_and_cidr_match_destination_ip():
    f = facts("example.com", ip="10.1.2.3", port=8080)
    assert match(parse_target("10.1.2.3"), f)
    assert match(parse_target("10.0.0.0/8"), f)
    assert not match(parse_target("10.1.2.4"), f)
    assert not match(parse_target("11.0.0.0/8"), f)
    assert match(parse_target("10.1.2.3:8080"), f)
    assert not match(parse_target("10.1.2.3:80"), f)
    assert match(parse_target("10.0.0.0/8:8080"), f)


def test_ip_literal_in_host_must_be_the_destination():
    """SPEC §10: IP rules match the destination the kernel saw; an IP literal in Host
    that differs from it is refused (400 / closed), never matched as an IP."""
    with pytest.raises(BadHost):
        facts("192.0.2.7:80", ip="198.18.0.5")
    with pytest.raises(BadHost):
        facts("0xc0.0.2.7", ip="198.18.0.5")     # the same literal in inet_aton spelling
    with pytest.raises(BadHost):
        facts("192.0.2.7:8080", ip="192.0.2.7")  # same address, another port
    f = facts("192.0.2.7:80", ip="192.0.2.7")
    assert match(parse_target("192.0.2.7"), f)
    assert match(parse_target("192.0.2.0/24"), f)
    assert facts("3221225991", ip="192.0.2.7").host == "192.0.2.7"


def test_ipv6_matching():
    f = facts("[2001:db8::1]:8080", ip="2001:db8::1", port=8080)
    assert match(parse_target("2001:db8::1"), f)
    assert match(parse_target("[2001:db8::1]:8080"), f)
    assert not match(parse_target("[2001:db8::1]:80"), f)
    assert match(parse_target("2001:db8::/32"), f)
    assert not match(parse_target("2001:db9::/32"), f)
    assert not match(parse_target("10.0.0.0/8"), f)


def test_port_rules():
    f = facts("example.com", port=8080)
    assert match(parse_target("example.com:8080"), f)
    assert not match(parse_target("example.com:80"), f)
    # No port: any port for host lists, the default port for routes.
    assert match(parse_target("example.com"), f)
    assert not match(parse_target("example.com"), f, default_port=80)
    assert match(parse_target("example.com"), facts("example.com"), default_port=80)


# -- precedence --------------------------------------------------------------------------

H_INST, H_CLASS, H_ALL, H_CLASS_ALL = "inst", "class", "all", "class_all"


def full_policy(**kw):
    base = dict(
        routes=(route("a.com", H_INST),),
        class_routes=(route("a.com", H_CLASS), route("b.com", H_CLASS)),
        catch_all=H_ALL,
        class_catch_all=H_CLASS_ALL,
        enable_internet=True,
    )
    base.update(kw)
    return Policy(**base)


def test_step1_denied_beats_everything():
    p = full_policy(denied_hosts=targets("a.com"), allowed_hosts=targets("a.com"))
    d = decide(facts("a.com"), p)
    assert (d.kind, d.rule, d.host) == ("deny", "denied_hosts", "a.com")
    assert d.deny_message == "denied by denied_hosts: a.com"


def test_step2_allowlist_beats_handlers():
    p = full_policy(allowed_hosts=targets("other.com"))
    for host in ("a.com", "b.com", "c.com"):
        d = decide(facts(host), p)
        assert (d.kind, d.rule) == ("deny", "allowed_hosts")
    assert decide(facts("c.com"), p).deny_message == "denied by allowed_hosts: c.com"


def test_handlers_are_not_implicitly_allowed_but_allowed_ones_run():
    p = full_policy(allowed_hosts=targets("a.com"))
    d = decide(facts("a.com"), p)
    assert (d.kind, d.handler, d.rule) == ("handler", H_INST, "routes")


def test_step3_instance_then_class_per_host():
    p = full_policy()
    assert decide(facts("a.com"), p).handler == H_INST
    assert decide(facts("b.com"), p).handler == H_CLASS
    assert decide(facts("b.com"), p).rule == "class_routes"


def test_step4_catch_all_instance_then_class():
    p = full_policy()
    d = decide(facts("c.com"), p)
    assert (d.kind, d.handler, d.rule) == ("handler", H_ALL, "catch_all")
    d = decide(facts("c.com"), full_policy(catch_all=None))
    assert (d.kind, d.handler, d.rule) == ("handler", H_CLASS_ALL, "class_catch_all")


def test_per_host_beats_catch_all():
    p = full_policy(routes=(), class_routes=(route("a.com", H_CLASS),))
    assert decide(facts("a.com"), p).handler == H_CLASS


def test_step5_egress_or_deny():
    p = Policy(enable_internet=True)
    d = decide(facts("c.com"), p)
    assert (d.kind, d.rule) == ("egress", "internet")
    d = decide(facts("c.com"), Policy(enable_internet=False))
    assert (d.kind, d.rule, d.deny_message) == ("deny", "no internet", "denied by no internet: c.com")
    d = decide(facts("c.com"), Policy(enable_internet=False, allowed_hosts=targets("*.com")))
    assert (d.kind, d.rule) == ("egress", "allowed_hosts")


def test_empty_allowlist_denies_everything():
    d = decide(facts("a.com"), Policy(allowed_hosts=()))
    assert (d.kind, d.rule) == ("deny", "allowed_hosts")


def test_exact_beats_glob_at_same_level():
    p = Policy(routes=(route("*.example.com", "glob"), route("api.example.com", "exact"), route("*", "star")))
    assert decide(facts("api.example.com"), p).handler == "exact"
    assert decide(facts("www.example.com"), p).handler == "glob"
    assert decide(facts("other.org"), p).handler == "star"
    # More literal characters is more specific; longer CIDR prefixes likewise.
    p = Policy(routes=(route("*.com", "short"), route("*.example.com", "long")))
    assert decide(facts("a.example.com"), p).handler == "long"
    p = Policy(routes=(route("10.0.0.0/8", "wide"), route("10.1.0.0/16", "narrow"), route("10.1.2.3", "ip")))
    assert decide(facts(None, ip="10.1.2.3"), p).handler == "ip"
    assert decide(facts(None, ip="10.1.2.4"), p).handler == "narrow"
    assert decide(facts(None, ip="10.2.0.1"), p).handler == "wide"
    # Equal specificity: the first registered.
    p = Policy(routes=(route("*.a.com", "first"), route("x.*.com", "second")))
    assert decide(facts("x.a.com"), p).handler == "first"


def test_exact_class_does_not_beat_instance_glob():
    # "at the same level": instance per-host (step 3a) is a level above class per-host.
    p = Policy(routes=(route("*.a.com", "inst-glob"),), class_routes=(route("x.a.com", "class-exact"),))
    assert decide(facts("x.a.com"), p).handler == "inst-glob"


def test_route_ports_default_to_80_and_443():
    p = Policy(routes=(route("a.com", "h"),))
    assert decide(facts("a.com", port=80), p).kind == "handler"
    assert decide(facts("a.com", port=8080), p).kind == "egress"
    p = Policy(routes=(route("a.com:8080", "h"),))
    assert decide(facts("a.com", port=8080), p).kind == "handler"
    assert decide(facts("a.com", port=80), p).kind == "egress"


def test_ip_port_route_and_denied_ip_port():
    p = Policy(routes=(route("10.0.0.5:8080", "h"),), denied_hosts=targets("10.0.0.6:22"))
    assert decide(facts(None, ip="10.0.0.5", port=8080), p).handler == "h"
    assert decide(facts(None, ip="10.0.0.5", port=80), p).kind == "egress"
    assert decide(facts(None, ip="10.0.0.6", port=22), p).kind == "deny"
    assert decide(facts(None, ip="10.0.0.6", port=23), p).kind == "egress"


def test_denied_without_port_matches_any_port():
    p = Policy(denied_hosts=targets("evil.com", "10.0.0.0/8", "2001:db8::/32"))
    for port in (80, 443, 8080):
        assert decide(facts("evil.com", port=port), p).kind == "deny"
        assert decide(facts("x.org", ip="10.9.9.9", port=port), p).kind == "deny"
        assert decide(facts("x.org", ip="2001:db8::5", port=port), p).kind == "deny"


def test_denied_display_host_falls_back_to_ip():
    d = decide(facts(None, ip="10.0.0.1"), Policy(denied_hosts=targets("10.0.0.1")))
    assert d.deny_message == "denied by denied_hosts: 10.0.0.1"


# -- HTTPS -------------------------------------------------------------------------------

def https(host, ip="93.184.216.34", port=443):
    return facts(host, ip=ip, port=port, scheme="https")


def test_https_passthrough_by_default():
    p = Policy(routes=(route("a.com", "h"),), catch_all="all")
    d = decide(https("a.com"), p)
    assert (d.kind, d.terminate_tls) == ("egress", False)
    assert decide(https("b.com"), p).kind == "egress"


def test_https_registration_terminates():
    p = Policy(routes=(route("a.com", "hs", schemes=("https",)),))
    d = decide(https("a.com"), p)
    assert (d.kind, d.handler, d.terminate_tls) == ("handler", "hs", True)
    assert decide(facts("a.com"), p).kind == "egress"  # not an HTTP route
    assert decide(https("a.com", port=8443), p).kind == "egress"  # 443 only
    star = Policy(routes=(route("*", "all", schemes=("https",)),))
    assert decide(https(None), star).handler == "all"


def test_intercept_https_flag_applies_routes_and_catch_all():
    p = Policy(routes=(route("a.com", "h"),), catch_all="all", intercept_https=True)
    d = decide(https("a.com"), p)
    assert (d.handler, d.terminate_tls) == ("h", True)
    d = decide(https("b.com"), p)
    assert (d.handler, d.terminate_tls) == ("all", True)
    d = decide(https("b.com"), Policy(intercept_https=True))
    assert (d.kind, d.terminate_tls) == ("egress", True)


def test_https_denied_and_allowlist_by_sni():
    p = Policy(allowed_hosts=targets("ok.com"), denied_hosts=targets("bad.ok.com"))
    assert decide(https("ok.com"), p).kind == "egress"
    assert decide(https("bad.ok.com"), p).rule == "denied_hosts"
    assert decide(https("other.com"), p).rule == "allowed_hosts"


def test_policy_validates_types():
    with pytest.raises(TypeError):
        Policy(denied_hosts=["a.com"])
    with pytest.raises(TypeError):
        Policy(routes=(parse_target("a.com"),))
    with pytest.raises(ValueError):
        Facts.make("a.com", "1.2.3.4", 80, "ftp")
    assert Policy(routes=(route("a", "h", ("https",)),)).https_routes
    assert not Policy(routes=(route("a", "h"),)).https_routes
    assert Policy(intercept_https=True).https_routes


# -- properties --------------------------------------------------------------------------

label = st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}", fullmatch=True)


def _not_ip(name):
    try:
        ipaddress.ip_address(name)
    except ValueError:
        # A name ending in a number is an IP literal (inet_aton spelling) or malformed
        # (SPEC §10 / parse_authority): not a host name either.
        tail = name.rsplit(".", 1)[-1]
        return not (tail.isdigit() or tail.startswith("0x"))
    return False


# An all-numeric dotted quad is an IP literal, matched as an IP (tested elsewhere).
hostname = st.lists(label, min_size=1, max_size=5).map(".".join).filter(_not_ip)


@settings(max_examples=300, deadline=None)
@given(hostname)
def test_prop_exact_matches_itself_any_case(name):
    assert match(parse_target(name.upper() + "."), facts(name))
    assert match(parse_target("*"), facts(name))


@settings(max_examples=300, deadline=None)
@given(st.lists(label, min_size=1, max_size=4), st.lists(label, min_size=1, max_size=3))
def test_prop_star_prefix_glob(prefix, suffix):
    host = ".".join(prefix + suffix)
    assume(_not_ip(host))
    glob = parse_target("*." + ".".join(suffix))
    assert match(glob, facts(host))
    assert not match(glob, facts(".".join(suffix)))


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_prop_cidr_contains(ip, prefix):
    net = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    assert match(parse_target(str(net)), facts(None, ip=str(ip)))


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(v=6), st.integers(1, 65535))
def test_prop_ipv6_bracket_port(ip, port):
    t = parse_target(f"[{ip}]:{port}")
    assert (t.kind, t.port) == ("ip", port)
    assert match(t, facts(None, ip=str(ip), port=port))
    assert parse_target(str(ip)).port is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_prop_parse_never_crashes_otherwise(text):
    try:
        t = parse_target(text)
    except ValueError:
        return
    assert isinstance(t, Target)


@settings(max_examples=300, deadline=None)
@given(hostname, st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_prop_precedence(host, denied, allowlisted, has_route, has_catch_all, internet):
    p = Policy(
        denied_hosts=targets(host) if denied else (),
        allowed_hosts=targets(host) if allowlisted else targets("never.invalid"),
        routes=(route(host, "r"),) if has_route else (),
        catch_all="c" if has_catch_all else None,
        enable_internet=internet,
    )
    d = decide(facts(host), p)
    assert isinstance(d, Decision)
    if denied:
        assert d.rule == "denied_hosts"
    elif not allowlisted:
        assert d.rule == "allowed_hosts" and d.kind == "deny"
    elif has_route:
        assert d.handler == "r"
    elif has_catch_all:
        assert d.handler == "c"
    else:
        assert (d.kind, d.rule) == ("egress", "allowed_hosts")


def test_parse_host_has_no_port():
    assert parse_host("a.com").port is None
    with pytest.raises(ValueError):
        parse_host("a.com:80")
