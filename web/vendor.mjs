// Copies the front-end libraries from node_modules (installed at the exact versions of
// package-lock.json) into static/vendor/, with their licences, for the binary to embed.
// Run: npm ci --ignore-scripts && npm run vendor   (see README.md). Its output is
// committed, so building tally needs no Node.
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "static", "vendor");

const libs = {
  uplot: {
    dir: "uplot",
    files: ["dist/uPlot.esm.js", "dist/uPlot.min.css", "LICENSE"],
  },
  "swagger-ui-dist": {
    dir: "swagger-ui",
    files: [
      "swagger-ui-bundle.js",
      "swagger-ui-bundle.js.LICENSE.txt",
      "swagger-ui.css",
      "LICENSE",
      "NOTICE",
    ],
  },
};

// Source maps are not shipped: a reference to one would make devtools ask for it.
const stripMap = (text) => text.replace(/\n?\/[/*]# sourceMappingURL=\S+\s*(\*\/)?\s*$/, "\n");

rmSync(out, { recursive: true, force: true });
const versions = [];
for (const [pkg, { dir, files }] of Object.entries(libs)) {
  const src = join(here, "node_modules", pkg);
  const meta = JSON.parse(readFileSync(join(src, "package.json"), "utf8"));
  mkdirSync(join(out, dir), { recursive: true });
  for (const f of files) {
    const dest = join(out, dir, f.split("/").pop());
    if (/\.(js|css)$/.test(f)) {
      writeFileSync(dest, stripMap(readFileSync(join(src, f), "utf8")));
    } else {
      copyFileSync(join(src, f), dest);
    }
  }
  versions.push(`${pkg} ${meta.version} (${meta.license}) -> vendor/${dir}/`);
}
writeFileSync(join(out, "VERSIONS.txt"), versions.join("\n") + "\n");
console.log(versions.join("\n"));
