"""py-consul (PyPI `py-consul`, import name `consul`) against the demo agent, called the way
its users call it. Driven by demo-agent/tests/consul_clients.rs:

    python py_consul_test.py --url http://127.0.0.1:PORT --upstream embedded|etcd

With `--upstream etcd` the script asks its driver to replace the etcd cluster behind the
agent (it prints `REPLACE` and waits for a line on stdin) to see the index go backwards.
Every check prints `ok <name>`; the first failure raises (a non-zero exit).
"""

import argparse
import sys
import threading
import time
import urllib.parse
import urllib.request

import consul
from consul.callback import CB


def check(name, condition, detail=""):
    if not condition:
        raise AssertionError(f"{name} failed: {detail}")
    print(f"ok {name}", flush=True)


def raises(exception, call):
    try:
        call()
    except exception as error:
        return str(error)
    return None


def metric(url, sample):
    with urllib.request.urlopen(f"{url}/v1/agent/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
    return 0.0


def wait_until(what, probe, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--upstream", choices=["embedded", "etcd"], required=True)
    args = parser.parse_args()
    parsed = urllib.parse.urlparse(args.url)
    c = consul.Consul(host=parsed.hostname, port=parsed.port)
    other = consul.Consul(host=parsed.hostname, port=parsed.port)

    # Probes.
    leader = c.status.leader()
    check("status.leader", isinstance(leader, str) and leader.endswith(str(parsed.port)), leader)
    check("status.peers", c.status.peers() == [leader], c.status.peers())
    me = c.agent.self()
    check("agent.self", me["Config"]["Datacenter"] == "dc1" and me["DemoAgent"]["Upstream"] == args.upstream, me)

    # get / put.
    index, data = c.kv.get("py/absent")
    check("get absent", data is None and int(index) >= 1, (index, data))
    check("put", c.kv.put("py/a", "hello") is True)
    index, data = c.kv.get("py/a")
    check("get", data["Value"] == b"hello" and data["Key"] == "py/a" and data["Flags"] == 0, data)
    check("get index", int(index) == data["ModifyIndex"] and data["CreateIndex"] >= 1, (index, data))
    check("session omitted", "Session" not in data and data["LockIndex"] == 0, data)

    # Flags and binary values.
    check("put flags", c.kv.put("py/flags", "f", flags=42) is True)
    _, data = c.kv.get("py/flags")
    check("get flags", data["Flags"] == 42 and data["Value"] == b"f", data)
    blob = bytes(range(256))
    check("put binary", c.kv.put("py/bin", blob) is True)
    _, data = c.kv.get("py/bin")
    check("get binary", data["Value"] == blob, data)
    raw = c.http.get(CB.binary(), "/v1/kv/py/bin", params=[("raw", "1")], raw=True)
    check("raw", raw == blob, raw[:16])

    # Compare-and-set.
    _, data = c.kv.get("py/a")
    modify = data["ModifyIndex"]
    check("cas true", c.kv.put("py/a", "v2", cas=modify) is True)
    check("cas false (stale index)", c.kv.put("py/a", "v3", cas=modify) is False)
    check("cas false (create only)", c.kv.put("py/a", "v3", cas=0) is False)
    check("cas create", c.kv.put("py/new", "n", cas=0) is True)
    _, data = c.kv.get("py/a")
    check("cas kept the winner", data["Value"] == b"v2", data)

    # Delete.
    check("delete cas false", c.kv.delete("py/a", cas=modify) is False)
    check("delete", c.kv.delete("py/a") is True)
    _, data = c.kv.get("py/a")
    check("deleted", data is None, data)

    # Recurse, keys with a separator, recursive delete.
    for key in ["py/r/1", "py/r/2", "py/r/sub/3"]:
        c.kv.put(key, key)
    _, entries = c.kv.get("py/r/", recurse=True)
    check("recurse", [e["Key"] for e in entries] == ["py/r/1", "py/r/2", "py/r/sub/3"], entries)
    check("recurse values", entries[2]["Value"] == b"py/r/sub/3", entries)
    _, keys = c.kv.get("py/r/", keys=True, separator="/")
    check("keys separator", keys == ["py/r/1", "py/r/2", "py/r/sub/"], keys)
    _, keys = c.kv.get("py/r/", keys=True)
    check("keys", keys == ["py/r/1", "py/r/2", "py/r/sub/3"], keys)
    _, none = c.kv.get("py/nothing/", recurse=True)
    check("recurse none", none is None, none)
    check("delete recurse", c.kv.delete("py/r/", recurse=True) is True)
    _, gone = c.kv.get("py/r/", recurse=True)
    check("deleted recurse", gone is None, gone)

    # Consistency modes and the datacenter.
    for mode in ["stale", "consistent"]:
        _, data = consul.Consul(host=parsed.hostname, port=parsed.port, consistency=mode).kv.get("py/flags")
        check(f"consistency {mode}", data["Flags"] == 42, data)
    _, data = consul.Consul(host=parsed.hostname, port=parsed.port, dc="dc1").kv.get("py/flags")
    check("dc1", data is not None)
    check("other dc refused", raises(consul.ConsulException, lambda: c.kv.get("py/flags", dc="dc9")) is not None)

    # Sessions and locks are refused, naming what.
    error = raises(consul.ConsulException, lambda: c.kv.put("py/lock", "x", acquire="abc"))
    check("acquire refused", error is not None and "acquire" in error, error)
    _, data = c.kv.get("py/lock")
    check("acquire wrote nothing", data is None, data)
    check("session refused", raises(consul.ConsulException, lambda: c.session.create()) is not None)

    # A blocking get woken by a put from another client.
    index, _ = c.kv.get("py/w")
    before = metric(args.url, "demo_agent_upstream_blocking_queries")
    result = {}

    def blocking_get():
        started = time.monotonic()
        result["answer"] = c.kv.get("py/w", index=index, wait="30s")
        result["elapsed"] = time.monotonic() - started

    reader = threading.Thread(target=blocking_get)
    reader.start()
    wait_until("the blocking query to be open", lambda: metric(args.url, "demo_agent_upstream_blocking_queries") > before)
    other.kv.put("py/w", "woken")
    reader.join(timeout=40)
    new_index, data = result["answer"]
    check("blocking get woken", data["Value"] == b"woken" and int(new_index) > int(index), result)
    check("blocking get was quick", result["elapsed"] < 25, result)
    # And one that sees no change answers at its wait with the same index.
    started = time.monotonic()
    same, _ = c.kv.get("py/w", index=new_index, wait="1s")
    elapsed = time.monotonic() - started
    check("blocking get times out", same == new_index and 0.9 <= elapsed < 3.0, (same, elapsed))

    # The index goes backwards: the client sees a lower index and starts over.
    if args.upstream == "etcd":
        high, _ = c.kv.get("py/w")
        print("REPLACE", flush=True)
        line = sys.stdin.readline().strip()
        check("cluster replaced", line == "OK", line)
        started = time.monotonic()
        low, data = c.kv.get("py/w", index=high, wait="20s")
        check("index went backwards", int(low) < int(high), (low, high))
        check("backwards answers at once", time.monotonic() - started < 15)
        check("new cluster's value", data is not None and data["Value"] == b"replaced", data)
    else:
        high, _ = c.kv.get("py/w")
        future = str(int(high) * 1000 + 1000)
        started = time.monotonic()
        low, data = c.kv.get("py/w", index=future, wait="20s")
        check("index went backwards", int(low) < int(future), (low, future))
        check("backwards answers at once", time.monotonic() - started < 5)
        check("same value", data["Value"] == b"woken", data)

    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
