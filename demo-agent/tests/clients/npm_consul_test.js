// The npm `consul` client (2.x) against the demo agent, called the way its users call it.
// Driven by demo-agent/tests/consul_clients.rs:
//
//     NODE_PATH=<dir with node_modules/consul> node npm_consul_test.js --url http://127.0.0.1:PORT --upstream embedded|etcd
//
// Every check prints `ok <name>`; the first failure exits non-zero.
"use strict";

const Consul = require("consul");

function arg(name) {
  const at = process.argv.indexOf(name);
  if (at < 0 || at + 1 >= process.argv.length) throw new Error(`missing ${name}`);
  return process.argv[at + 1];
}

function check(name, condition, detail) {
  if (!condition) {
    throw new Error(`${name} failed: ${JSON.stringify(detail)}`);
  }
  console.log(`ok ${name}`);
}

async function main() {
  const url = new URL(arg("--url"));
  const upstream = arg("--upstream");
  const c = new Consul({ host: url.hostname, port: Number(url.port) });

  check("status.leader", (await c.status.leader()).endsWith(url.port));
  const self = await c.agent.self();
  check("agent.self", self.Config.Datacenter === "dc1" && self.DemoAgent.Upstream === upstream, self);

  check("set", (await c.kv.set("npm/a", "hello")) === true);
  const a = await c.kv.get("npm/a");
  check("get", a.Value === "hello" && a.Flags === 0 && a.Key === "npm/a", a);
  check("get missing", (await c.kv.get("npm/missing")) === undefined);
  check("set flags", (await c.kv.set({ key: "npm/f", value: "x", flags: 42 })) === true);
  check("get flags", (await c.kv.get("npm/f")).Flags === 42);
  const buffer = Buffer.from([0, 1, 2, 254, 255]);
  check("set buffer", (await c.kv.set("npm/bin", buffer)) === true);
  const bin = await c.kv.get({ key: "npm/bin", buffer: true });
  check("get buffer", Buffer.isBuffer(bin.Value) && bin.Value.equals(buffer), bin);

  check("cas true", (await c.kv.set({ key: "npm/a", value: "v2", cas: a.ModifyIndex })) === true);
  const lost = await c.kv.set({ key: "npm/a", value: "v3", cas: a.ModifyIndex });
  check("cas false", !lost, lost);
  check("cas kept the winner", (await c.kv.get("npm/a")).Value === "v2");

  for (const key of ["npm/r/1", "npm/r/2", "npm/r/sub/3"]) await c.kv.set(key, key);
  const all = await c.kv.get({ key: "npm/r/", recurse: true });
  check("recurse", all.map((e) => e.Key).join(",") === "npm/r/1,npm/r/2,npm/r/sub/3", all);
  const keys = await c.kv.keys({ key: "npm/r/", separator: "/" });
  check("keys separator", keys.join(",") === "npm/r/1,npm/r/2,npm/r/sub/", keys);
  check("del recurse", (await c.kv.del({ key: "npm/r/", recurse: true })) === true);
  check("deleted recurse", (await c.kv.get({ key: "npm/r/", recurse: true })) === undefined);
  check("del", (await c.kv.del("npm/a")) === true);
  check("deleted", (await c.kv.get("npm/a")) === undefined);

  let refused = null;
  try {
    await c.kv.set({ key: "npm/lock", value: "x", acquire: "abc" });
  } catch (error) {
    refused = error.message;
  }
  check("acquire refused", refused !== null, refused);
  check("acquire wrote nothing", (await c.kv.get("npm/lock")) === undefined);

  // A watch: its first change, then the change a write makes.
  await c.kv.set("npm/w", "1");
  const seen = await new Promise((resolve, reject) => {
    const values = [];
    const watch = c.watch({ method: c.kv.get, options: { key: "npm/w", wait: "30s" } });
    const timer = setTimeout(() => {
      watch.end();
      reject(new Error(`watch saw ${JSON.stringify(values)}`));
    }, 20000);
    watch.on("change", (data) => {
      values.push(data && data.Value);
      if (values.length === 1) c.kv.set("npm/w", "2");
      if (values.includes("2")) {
        clearTimeout(timer);
        watch.end();
        resolve(values);
      }
    });
    watch.on("error", (error) => {
      clearTimeout(timer);
      watch.end();
      reject(error);
    });
  });
  check("watch", seen[0] === "1" && seen[seen.length - 1] === "2", seen);
  console.log("ALL OK");
}

main().catch((error) => {
  console.error(error.stack || String(error));
  process.exit(1);
});
