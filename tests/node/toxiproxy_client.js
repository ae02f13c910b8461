// toxiproxy-node-client (npm), unchanged, driving gproxy --api: node toxiproxy_client.js API_URL UPSTREAM
// Exits non-zero on the first answer that differs from what toxiproxy would give.
const assert = require("assert");
const { Toxiproxy } = require("toxiproxy-node-client");

(async () => {
  const [url, upstream] = process.argv.slice(2);
  const tp = new Toxiproxy(url);
  assert.ok(JSON.parse(await tp.getVersion()).version);

  const proxy = await tp.createProxy({ name: "node", listen: "127.0.0.1:0", upstream });
  assert.strictEqual(proxy.enabled, true);
  assert.match(proxy.listen, /^127\.0\.0\.1:[1-9][0-9]*$/);

  const toxic = await proxy.addToxic({ type: "latency", stream: "downstream", toxicity: 1,
                                       attributes: { latency: 200 } });
  assert.deepStrictEqual(toxic.toJson(), { attributes: { latency: 200, jitter: 0 }, name: "latency_downstream",
                                           stream: "downstream", toxicity: 1, type: "latency" });
  const updated = await toxic.update({ attributes: { latency: 300 }, toxicity: 0.5 });
  assert.strictEqual(updated.attributes.latency, 300);
  assert.strictEqual(updated.toxicity, 0.5);
  const got = await proxy.getToxic("latency_downstream");
  assert.deepStrictEqual(got.toJson(), updated.toJson());
  await got.remove();

  assert.strictEqual((await proxy.update({ enabled: false })).enabled, false);
  const populated = await tp.populate([{ name: "node", listen: proxy.listen, upstream }]);
  assert.deepStrictEqual(Object.keys(populated), ["node"]);
  assert.strictEqual(populated.node.listen, proxy.listen);
  await tp.reset();
  assert.strictEqual((await tp.get("node")).enabled, true);

  await assert.rejects(tp.createProxy({ name: "node", upstream }), /409/);
  await assert.rejects(tp.get("missing"), /404/);
  await proxy.remove();
  assert.deepStrictEqual(Object.keys(await tp.getAll()), []);
  console.log("toxiproxy-node-client: all passed");
})().catch((error) => {
  console.error(error);
  process.exit(1);
});
