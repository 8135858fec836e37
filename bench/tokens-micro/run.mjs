// Times each export of the .wasm given: ROUNDS rounds of N calls, after a warm-up; prints the
// median and the minimum ns per call. Every import (the proxy-wasm host) is a stub: never called.
import { readFileSync } from "node:fs";

const [file, rounds = "40", n = "2000"] = process.argv.slice(2);
const module = new WebAssembly.Module(readFileSync(file));
const imports = {};
for (const imp of WebAssembly.Module.imports(module)) {
  (imports[imp.module] ??= {})[imp.name] = () => 0;
}
const { exports } = new WebAssembly.Instance(module, imports);
const out = {};
for (const name of ["estimate", "copy", "usage", "usage_only"]) {
  const f = exports[name];
  for (let i = 0; i < 5; i++) f(Number(n));
  const ns = [];
  for (let r = 0; r < Number(rounds); r++) {
    const t0 = process.hrtime.bigint();
    f(Number(n));
    ns.push(Number(process.hrtime.bigint() - t0) / Number(n));
  }
  ns.sort((a, b) => a - b);
  out[name] = { median_ns: ns[ns.length >> 1], min_ns: ns[0] };
}
console.log(JSON.stringify(out));
