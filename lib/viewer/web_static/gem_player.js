// GEM player: a Gaussian eigen model evaluated and splatted with WebGL2, no server, no downloads.
//
// Data: window.GEM_B85 (gem.js), base85 of the gzipped container that lib/viewer/compressed.py writes:
// "GEMW", uint32 header length, JSON header, little-endian arrays at 4-byte offsets. Each basis row k
// is uint8 q with value = scale_k (q - zero_k) (its own bits; the page needs only scale and zero).
//
// Each frame:
//  1. evaluate: mean + sum_k c_k sqrt(lambda_k) basis_k, as mean + shift + sum_k a_k q_k with a_k =
//     c_k sqrt(lambda_k) scale_k and shift = -sum_k a_k zero_k (the quantised values as the file holds
//     them), then the quaternion normalised (wxyz), scales clamped at 0, opacity clamped to [0, 1], in
//     three float textures. Where: on the CPU (CpuModel: a WebAssembly SIMD loop over the bytes, then an
//     upload) where WebGL is a software renderer, or in a pass on the GPU (one fragment per Gaussian,
//     texel i % TW, i / TW, the bytes bit-packed at their own bits into RGBA32UI texels; see evalSource)
//     where it is a real GPU; ?eval=cpu|gpu chooses. The CPU evaluates the positions in both cases;
//  2. sort: those positions (on the CPU: cheaper than a read-back, which stalls) sorted by camera depth
//     (a stable radix sort of the float bits, so ties keep the lower index first, as the Python
//     rasterizer does);
//  3. splat: one quad (two triangles; its Gaussian read from the sorted order texture) per Gaussian,
//     with the rasterizer's rules (lib/gaussians/render_cpu.py, gsplat 1.5.3): EWA projection with the
//     Jacobian's clamped tangents, + 0.3 px^2 low-pass, the 3.33-sigma box of gsplat's radius,
//     alpha = min(0.999, o exp(-sigma)) dropped below 1/255, front-to-back "under" blending into a
//     float target, then the background times the transmittance.
// Conventions: OpenCV cameras (x right, y down, z forward), pixel (row i, col j) centred at
// (j + 0.5, i + 0.5), matrices row-major in JS (uploaded transposed), quaternions wxyz, metres.
"use strict";

(function () {
  const ATTRS = ["positions", "rotations", "scales", "opacities"];
  const CHANNELS = { positions: 3, rotations: 4, scales: 3, opacities: 1 };
  const SLOTS = [[["positions", 0]], [["rotations", 0]], [["scales", 0], ["opacities", 3]]]; // [attribute, first channel]
  const ATTR_SLOT = Object.fromEntries(SLOTS.flatMap((attrs, slot) => attrs.map(([a, first]) => [a, [slot, first]])));
  const TW = 1024; // texels per row of the per-Gaussian textures
  const NEAR = 0.01, FAR = 100.0;

  // ------------------------------------------------------------ container

  // base85, Python's b85encode alphabet, big-endian groups of 4 bytes; a last group of r + 1
  // characters holds r bytes (padded with the top digit, as b85decode does)
  function decodeBase85(text) {
    const ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~";
    const digit = new Uint8Array(128).fill(255);
    for (let i = 0; i < 85; i++) digit[ALPHABET.charCodeAt(i)] = i;
    const groups = Math.ceil(text.length / 5), rest = text.length % 5;
    const bytes = new Uint8Array(4 * groups), view = new DataView(bytes.buffer);
    for (let g = 0; g < groups; g++) {
      let value = 0;
      for (let i = 5 * g; i < 5 * g + 5; i++) {
        const d = i < text.length ? digit[text.charCodeAt(i)] : 84;
        if (d === 255) throw new Error("gem.js is damaged (not base85); export it again");
        value = value * 85 + d;
      }
      view.setUint32(4 * g, value >>> 0);
    }
    return bytes.buffer.slice(0, rest ? 4 * groups - 5 + rest : 4 * groups);
  }

  // the container is gzipped (the browser's own DecompressionStream: no library)
  async function inflate(buffer) {
    const bytes = new Uint8Array(buffer);
    if (bytes[0] !== 0x1f || bytes[1] !== 0x8b) return buffer;
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return await new Response(stream).arrayBuffer();
  }

  function unpack(buffer) {
    const magic = String.fromCharCode(...new Uint8Array(buffer, 0, 4));
    if (magic !== "GEMW") throw new Error("gem.js does not hold a compressed GEM (export it again)");
    const length = new DataView(buffer).getUint32(4, true);
    const meta = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, length)));
    const types = { float32: Float32Array, uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array, int32: Int32Array };
    const arrays = {};
    for (const [name, spec] of Object.entries(meta.arrays)) {
      const count = spec.shape.reduce((a, b) => a * b, 1);
      arrays[name] = new types[spec.dtype](buffer, 8 + length + spec.offset, count);
    }
    return { meta, arrays };
  }

  // ------------------------------------------------------------ small matrix helpers (row-major)

  function mul4(a, b) {
    const o = new Float64Array(16);
    for (let i = 0; i < 4; i++) for (let j = 0; j < 4; j++) {
      let s = 0;
      for (let k = 0; k < 4; k++) s += a[4 * i + k] * b[4 * k + j];
      o[4 * i + j] = s;
    }
    return o;
  }

  function rigid(R, t) { // R [9] row-major, t [3] -> 4x4
    return Float64Array.from([R[0], R[1], R[2], t[0], R[3], R[4], R[5], t[1], R[6], R[7], R[8], t[2], 0, 0, 0, 1]);
  }

  function rotation(axis, angle) { // Rodrigues, row-major 3x3
    const n = Math.hypot(axis[0], axis[1], axis[2]) || 1;
    const [x, y, z] = axis.map((v) => v / n), c = Math.cos(angle), s = Math.sin(angle), C = 1 - c;
    return [c + x * x * C, x * y * C - z * s, x * z * C + y * s,
            y * x * C + z * s, c + y * y * C, y * z * C - x * s,
            z * x * C - y * s, z * y * C + x * s, c + z * z * C];
  }

  function mul3(a, b) {
    const o = new Array(9).fill(0);
    for (let i = 0; i < 3; i++) for (let j = 0; j < 3; j++) for (let k = 0; k < 3; k++) o[3 * i + j] += a[3 * i + k] * b[3 * k + j];
    return o;
  }

  function apply3(R, v) { return [0, 1, 2].map((i) => R[3 * i] * v[0] + R[3 * i + 1] * v[1] + R[3 * i + 2] * v[2]); }

  // ------------------------------------------------------------ the model on the CPU (WebAssembly SIMD)

  // One WebAssembly function, axpy(acc, q, n, a): acc[i] += a * q[i] for i < n (n a multiple of 16; q bytes,
  // acc float32; both byte addresses in the module's memory), 16 bytes a step: widened to four f32x4,
  // times a, added to the accumulators. The module (about 230 bytes) is assembled here from the opcodes of
  // the WebAssembly core and SIMD specifications: no toolchain, no binary file.
  function axpyModule(pages) {
    const u32 = (n) => { const o = []; do { let b = n & 0x7f; n >>>= 7; if (n) b |= 0x80; o.push(b); } while (n); return o; };
    const vec = (items) => [...u32(items.length), ...items.flat()];
    const section = (id, body) => [id, ...u32(body.length), ...body];
    const name = (s) => vec([...s].map((c) => [c.charCodeAt(0)]));
    const [I32, F32, V128] = [0x7f, 0x7d, 0x7b];
    const get = (i) => [0x20, i], set = (i) => [0x21, i], tee = (i) => [0x22, i];
    const i32 = (v) => (v < 64 ? [0x41, v] : [0x41, (v & 0x7f) | 0x80, v >> 7]); // signed LEB128, 0 <= v < 8192
    const simd = (code) => [0xfd, ...u32(code)];
    const load = (offset) => [...simd(0x00), 4, offset], store = (offset) => [...simd(0x0b), 4, offset]; // align 16
    const [splat, lo8, hi8, lo16, hi16] = [simd(0x13), simd(0x89), simd(0x8a), simd(0xa9), simd(0xaa)];
    const [toFloat, add, mul] = [simd(0xfb), simd(0xe4), simd(0xe6)];  // f32x4.convert_i32x4_u, add, mul
    // locals: 0 acc, 1 q, 2 n, 3 a (the parameters); 4 a x4, 5 sixteen bytes, 6 and 7 their two halves as i16x8
    const quarter = (half, widen, offset) => [...get(0), ...get(0), ...load(offset), ...get(half), ...widen, ...toFloat,
                                               ...get(4), ...mul, ...add, ...store(offset)];
    const body = [
      ...vec([[4, V128]]),
      ...get(3), ...splat, ...set(4),
      0x02, 0x40, ...get(2), 0x45, 0x0d, 0,                      // block; if n == 0 leave
      0x03, 0x40,                                                // loop
      ...get(1), ...load(0), ...tee(5), ...lo8, ...set(6), ...get(5), ...hi8, ...set(7),
      ...quarter(6, lo16, 0), ...quarter(6, hi16, 16), ...quarter(7, lo16, 32), ...quarter(7, hi16, 48),
      ...get(1), ...i32(16), 0x6a, ...set(1),                    // q += 16
      ...get(0), ...i32(64), 0x6a, ...set(0),                    // acc += 64
      ...get(2), ...i32(16), 0x6b, ...tee(2), 0x0d, 0,           // n -= 16; again while n != 0
      0x0b, 0x0b, 0x0b];                                         // end loop, block, function
    return Uint8Array.from([0x00, 0x61, 0x73, 0x6d, 1, 0, 0, 0,
      ...section(1, vec([[0x60, ...vec([[I32], [I32], [I32], [F32]]), 0]])),  // type (i32 i32 i32 f32) -> ()
      ...section(3, vec([[0]])),                                               // function 0 has type 0
      ...section(5, vec([[0, ...u32(pages)]])),                                // memory of `pages` 64 KiB pages
      ...section(7, vec([[...name("axpy"), 0, 0], [...name("memory"), 2, 0]])),
      ...section(10, vec([[...u32(body.length), ...body]]))]);
  }

  // The GEM's linear part for some attributes on the CPU: value = mean + shift + sum_k a_k q_k over the
  // quantised rows as the file holds them (see Player.evaluate). The depth sort needs the positions every
  // frame; where WebGL is a software renderer (SwiftShader, llvmpipe) the CPU evaluates every attribute,
  // at about a sixth of the evaluation pass's cost there. Without WebAssembly SIMD, plain JavaScript.
  class CpuModel {
    // parts: attr -> {C, mean: Float32Array [N C], rows: [K] Uint8Array [N C]}
    constructor(N, parts) {
      this.layout = {};
      let qBytes = 0;
      for (const [attr, p] of Object.entries(parts)) {
        const n = 16 * Math.ceil((N * p.C) / 16);
        this.layout[attr] = { C: p.C, n, mean: p.mean, q: qBytes };
        qBytes += n * p.rows.length;
      }
      let accBytes = qBytes;
      for (const L of Object.values(this.layout)) { L.at = accBytes; accBytes += 4 * L.n; }
      const bytes = axpyModule(Math.max(1, Math.ceil(accBytes / 65536)));
      if (WebAssembly.validate(bytes)) {
        const { exports } = new WebAssembly.Instance(new WebAssembly.Module(bytes));
        [this.buffer, this.axpy, this.kernel] = [exports.memory.buffer, exports.axpy, "WebAssembly SIMD"];
      } else {
        this.buffer = new ArrayBuffer(accBytes);
        const f = new Float32Array(this.buffer), u = new Uint8Array(this.buffer);
        this.axpy = (acc, q, n, a) => { for (let i = 0, j = acc >> 2; i < n; i++, j++) f[j] += a * u[q + i]; };
        this.kernel = "JavaScript";
      }
      const memory = new Uint8Array(this.buffer);
      for (const [attr, p] of Object.entries(parts)) {
        const L = this.layout[attr];
        p.rows.forEach((row, k) => memory.set(row, L.q + k * L.n));
        L.acc = new Float32Array(this.buffer, L.at, L.n);
      }
    }

    // factors [K] (a_k), shift [C] -> the attribute's values [N C] (a view, valid until the next call)
    evaluate(attr, factors, shift) {
      const L = this.layout[attr], acc = L.acc, mean = L.mean, C = L.C;
      for (let i = 0; i < mean.length; i += C) for (let c = 0; c < C; c++) acc[i + c] = mean[i + c] + shift[c];
      for (let k = 0; k < factors.length; k++) if (factors[k] !== 0) this.axpy(L.at, L.q + k * L.n, L.n, factors[k]);
      return acc;
    }
  }

  function softwareRenderer(gl) {
    const info = gl.getExtension("WEBGL_debug_renderer_info");
    const name = String(gl.getParameter(info ? info.UNMASKED_RENDERER_WEBGL : gl.RENDERER));
    return /swiftshader|llvmpipe|softpipe|software|basic render/i.test(name);
  }

  // ------------------------------------------------------------ shaders

  const FULLSCREEN_VS = `#version 300 es
void main() { vec2 p = vec2(float((gl_VertexID << 1) & 2), float(gl_VertexID & 2)); gl_Position = vec4(p * 2.0 - 1.0, 0.0, 1.0); }`;

  // Three slots of per-Gaussian accumulators: positions (xyz), rotations (wxyz), scales (xyz) + opacity (w).
  // The quantised bases are bit-packed per Gaussian at their own bits (the file's basis_bits): a unit
  // (component k of one attribute, its C channels of b bits side by side) never straddles a uint32 word,
  // four words to an RGBA32UI texel of a usampler2DArray layer. In SwiftShader (software WebGL) the pass
  // costs about its texel fetches (~0.5 us per fetch of a 2x2 quad, measured loaded), so the fewer the
  // better: 15 texels for the default actor's 2-8 bits against 36 at a byte a component. The shader is
  // generated for the layout: constant shifts, masks and uniform indices (a dynamically indexed uniform
  // array and loop bounds from a uniform made the pass about twice as slow).
  // The factors a_k come in a uniform block, one vec4 per unit (its channels' factors).
  const SLOT_CHANNELS = { positions: "xyz", rotations: "xyzw", scales: "xyz", opacities: "w" };
  function evalSource(units) {
    const lines = [];
    let fetched = -1;
    units.map((u, i) => [u, i]).sort(([x], [y]) => x.word - y.word).forEach(([u, i]) => {
      const t = u.word >> 2, word = `w${t}.${"xyzw"[u.word & 3]}`, mask = `${(1 << u.bits) - 1}u`;
      if (t !== fetched) { lines.push(`  uvec4 w${t} = texelFetch(uBasis, ivec3(p, ${t}), 0);`); fetched = t; }
      const ch = SLOT_CHANNELS[u.attr], C = ch.length;
      const shifts = Array.from({ length: C }, (_, c) => `${word} >> ${u.shift + c * u.bits}u`);
      const q = C === 1 ? `float((${shifts[0]}) & ${mask})` : `vec${C}(uvec${C}(${shifts.join(", ")}) & ${mask})`;
      lines.push(`  acc${u.slot}.${ch} += uC[${i}].${ch} * ${q};`);
    });
    return `#version 300 es
precision highp float; precision highp int; precision highp usampler2DArray;
uniform highp sampler2D uMean0, uMean1, uMean2;
uniform usampler2DArray uBasis;
layout(std140) uniform Coefficients { vec4 uC[${Math.max(1, units.length)}]; vec4 uShift[3]; };
layout(location = 0) out vec4 oPos;
layout(location = 1) out vec4 oRot;
layout(location = 2) out vec4 oScaleOpacity;
void main() {
  ivec2 p = ivec2(gl_FragCoord.xy);
  vec4 acc0 = texelFetch(uMean0, p, 0) + uShift[0], acc1 = texelFetch(uMean1, p, 0) + uShift[1];
  vec4 acc2 = texelFetch(uMean2, p, 0) + uShift[2];
${lines.join("\n")}
  oPos = vec4(acc0.xyz, 1.0);
  oRot = acc1 / max(length(acc1), 1e-12);
  oScaleOpacity = vec4(max(acc2.xyz, 0.0), clamp(acc2.w, 0.0, 1.0));
}`;
  }

  const SPLAT_VS = `#version 300 es
precision highp float; precision highp int;
uniform highp sampler2D uPos, uRot, uScaleOpacity;
uniform highp sampler2D uColor;
uniform mat4 uView;   // GEM space -> camera (the world camera composed with the frame's GEM pose)
uniform vec4 uIntr;   // fx, fy, cx, cy in pixels
uniform vec2 uSize;   // width, height in pixels
uniform highp usampler2D uOrder; // [TW, TH] the Gaussian drawn in each depth-sorted slot
const int CORNERS[6] = int[6](0, 1, 2, 2, 1, 3);
flat out vec2 vMean;
flat out vec3 vConic;
flat out vec4 vColor;
void main() {
  gl_Position = vec4(0.0, 0.0, 2.0, 1.0); // outside the clip volume: not drawn
  int slot = gl_VertexID / 6, corner = CORNERS[gl_VertexID % 6];
  int index = int(texelFetch(uOrder, ivec2(slot % ${TW}, slot / ${TW}), 0).r);
  ivec2 p = ivec2(index % ${TW}, index / ${TW});
  vec3 m = texelFetch(uPos, p, 0).xyz;
  vec4 q = texelFetch(uRot, p, 0);
  vec4 so = texelFetch(uScaleOpacity, p, 0);
  vec4 mc = uView * vec4(m, 1.0);
  if (!(mc.z > ${NEAR} && mc.z < ${FAR.toFixed(1)}) || so.w < 1.0 / 255.0) return;
  q = q / max(length(q), 1e-12);
  float w = q.x, x = q.y, y = q.z, z = q.w;
  mat3 R = mat3(1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y + w * z), 2.0 * (x * z - w * y),
                2.0 * (x * y - w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z + w * x),
                2.0 * (x * z + w * y), 2.0 * (y * z - w * x), 1.0 - 2.0 * (x * x + y * y));
  mat3 M = R * mat3(so.x, 0.0, 0.0, 0.0, so.y, 0.0, 0.0, 0.0, so.z);
  mat3 W = mat3(uView);
  mat3 S = W * (M * transpose(M)) * transpose(W);
  float fx = uIntr.x, fy = uIntr.y, cx = uIntr.z, cy = uIntr.w;
  float limXPos = (uSize.x - cx) / fx + 0.3 * (0.5 * uSize.x / fx), limXNeg = cx / fx + 0.3 * (0.5 * uSize.x / fx);
  float limYPos = (uSize.y - cy) / fy + 0.3 * (0.5 * uSize.y / fy), limYNeg = cy / fy + 0.3 * (0.5 * uSize.y / fy);
  float tz = mc.z;
  float tx = tz * clamp(mc.x / tz, -limXNeg, limXPos), ty = tz * clamp(mc.y / tz, -limYNeg, limYPos);
  vec3 j0 = vec3(fx / tz, 0.0, -fx * tx / (tz * tz)), j1 = vec3(0.0, fy / tz, -fy * ty / (tz * tz));
  float a = dot(j0, S * j0) + 0.3, b = dot(j0, S * j1), c = dot(j1, S * j1) + 0.3;
  float det = a * c - b * b;
  if (!(det > 0.0)) return;
  vec2 mean = vec2(fx * mc.x / tz + cx, fy * mc.y / tz + cy);
  vec2 r = ceil(3.33 * sqrt(vec2(a, c)));
  if (mean.x + r.x <= 0.0 || mean.x - r.x >= uSize.x || mean.y + r.y <= 0.0 || mean.y - r.y >= uSize.y) return;
  vec2 px = mean + (vec2(float(corner & 1), float(corner >> 1)) * 2.0 - 1.0) * r;
  gl_Position = vec4(px.x / uSize.x * 2.0 - 1.0, 1.0 - px.y / uSize.y * 2.0, 0.0, 1.0);
  vMean = mean;
  vConic = vec3(c / det, -b / det, a / det);
  vColor = vec4(texelFetch(uColor, p, 0).rgb, so.w);
}`;

  const SPLAT_FS = `#version 300 es
precision highp float;
uniform float uHeight;
flat in vec2 vMean;
flat in vec3 vConic;
flat in vec4 vColor;
out vec4 o;
void main() {
  vec2 d = vMean - vec2(gl_FragCoord.x, uHeight - gl_FragCoord.y);
  float sigma = 0.5 * (vConic.x * d.x * d.x + vConic.z * d.y * d.y) + vConic.y * d.x * d.y;
  float alpha = min(0.999, vColor.a * exp(-sigma));
  if (sigma < 0.0 || alpha < 1.0 / 255.0) discard;
  o = vec4(vColor.rgb * alpha, alpha);
}`;

  const BACKGROUND_FS = `#version 300 es
precision highp float;
uniform vec3 uBackground;
out vec4 o;
void main() { o = vec4(uBackground, 1.0); }`;

  const PRESENT_FS = `#version 300 es
precision highp float;
uniform highp sampler2D uImage;
out vec4 o;
void main() { o = vec4(clamp(texelFetch(uImage, ivec2(gl_FragCoord.xy), 0).rgb, 0.0, 1.0), 1.0); }`;

  function compile(gl, vs, fs) {
    const program = gl.createProgram();
    for (const [type, source] of [[gl.VERTEX_SHADER, vs], [gl.FRAGMENT_SHADER, fs]]) {
      const shader = gl.createShader(type);
      gl.shaderSource(shader, source);
      gl.compileShader(shader);
      if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(shader));
      gl.attachShader(program, shader);
    }
    gl.linkProgram(program);
    if (!gl.getProgramParameter(program, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(program));
    const uniforms = {};
    const n = gl.getProgramParameter(program, gl.ACTIVE_UNIFORMS);
    for (let i = 0; i < n; i++) {
      const name = gl.getActiveUniform(program, i).name;
      uniforms[name] = gl.getUniformLocation(program, name);
    }
    return { program, uniforms };
  }

  function floatTexture(gl, width, height, data, internal = gl.RGBA32F) {
    const tex = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, tex);
    gl.texImage2D(gl.TEXTURE_2D, 0, internal, width, height, 0, gl.RGBA,
                  internal === gl.RGBA16F ? gl.HALF_FLOAT : gl.FLOAT, data);
    for (const p of [gl.TEXTURE_MIN_FILTER, gl.TEXTURE_MAG_FILTER]) gl.texParameteri(gl.TEXTURE_2D, p, gl.NEAREST);
    return tex;
  }

  // ------------------------------------------------------------ the model on the GPU

  class Player {
    // evalMode: "gpu" (the evaluation pass), "cpu" (CpuModel, uploaded) or "auto" (cpu on a software renderer)
    constructor(canvas, buffer, scale, evalMode = "auto") {
      const { meta, arrays } = unpack(buffer);
      this.meta = meta;
      this.arrays = arrays;
      this.N = meta.n_gaussians;
      this.TH = Math.max(1, Math.ceil(this.N / TW));
      const gl = canvas.getContext("webgl2", { antialias: false, alpha: false, preserveDrawingBuffer: true });
      if (!gl) throw new Error("this browser has no WebGL2");
      if (!gl.getExtension("EXT_color_buffer_float")) throw new Error("WebGL2 without EXT_color_buffer_float");
      this.gl = gl;
      this.floatBlend = !!gl.getExtension("EXT_float_blend");
      if (!["auto", "cpu", "gpu"].includes(evalMode)) throw new Error(`eval=${evalMode}: use auto, cpu or gpu`);
      this.evalMode = evalMode === "auto" ? (softwareRenderer(gl) ? "cpu" : "gpu") : evalMode;

      const v = meta.view;
      this.width = Math.round(v.width * scale);
      this.height = Math.round(v.height * scale);
      canvas.width = this.width;
      canvas.height = this.height;
      this.K = [v.K[0][0] * scale, v.K[1][1] * scale, v.K[0][2] * scale, v.K[1][2] * scale];
      this.V0 = Float64Array.from(v.viewmat.flat());
      this.target = v.target;
      this.background = v.background;
      this.orbit = { yaw: 0, pitch: 0, zoom: 1 };

      this.components = {};
      this.offsets = {};
      let start = 0;
      for (const a of ATTRS) {
        this.components[a] = meta.attributes[a].blocks.reduce((s, b) => s + b.components, 0);
        this.offsets[a] = start;
        start += this.components[a];
      }
      this.nCoefficients = start;
      this.coefficients = new Float32Array(start);
      this.tracks = meta.tracks.map((t, i) => ({
        ...t,
        coefficients: arrays[`track.${i}.coefficients`], R: arrays[`track.${i}.R`], t: arrays[`track.${i}.t`],
      }));
      this.track = 0;
      this.frame = 0;
      this.pose = rigid([1, 0, 0, 0, 1, 0, 0, 0, 1], [0, 0, 0]);

      this._upload();
      if (this.evalMode === "gpu") this.evalProgram = compile(gl, FULLSCREEN_VS, evalSource(this.units));
      this.splatProgram = compile(gl, SPLAT_VS, SPLAT_FS);
      this.backgroundProgram = compile(gl, FULLSCREEN_VS, BACKGROUND_FS);
      this.presentProgram = compile(gl, FULLSCREEN_VS, PRESENT_FS);
      this._targets();
      this.keys = new Uint32Array(this.N);
      this.order = new Uint32Array(TW * this.TH);
      this.scratch = new Uint32Array(TW * this.TH);
      this.scratchKeys = new Uint32Array(this.N);
      this.depth32 = new Float32Array(1);
      this.depthBits = new Uint32Array(this.depth32.buffer);
      this.dirty = true;
      this.setFrame(0);
    }

    // The CPU model (positions, or every attribute in "cpu" mode) and, for the evaluation pass, per-slot
    // mean textures [TW, TH] (dequantised, float) and one bit-packed basis texture [TW, TH, texels]
    // RGBA32UI (see evalSource). A Gaussian outside a component's part holds the row's zero.
    _upload() {
      const gl = this.gl, size = TW * this.TH * 4, N = this.N;
      this.factor = {};  // attribute -> [K] sqrt(lambda_k) scale_k
      this.zero = {};    // attribute -> [K] zero_k
      this.units = [];   // {slot, attr, first, k, bits, word, shift}: component k of attr, in its bits at word, shift
      const means = SLOTS.map(() => new Float32Array(size));
      const quantised = {};  // attribute -> [K] Uint8Array [N, C]
      SLOTS.forEach((attrs, slot) => attrs.forEach(([a, first]) => {
        const C = CHANNELS[a], mean = means[slot];
        this.factor[a] = new Float32Array(this.components[a]);
        this.zero[a] = new Float32Array(this.components[a]);
        quantised[a] = [];
        let layer = 0;
        this.meta.attributes[a].blocks.forEach((b, i) => {
          const key = `${a}.${i}`, index = this.arrays[key + ".index"];
          const mq = this.arrays[key + ".mean"], bq = this.arrays[key + ".basis"], lam = this.arrays[key + ".eigenvalues"];
          for (let g = 0; g < b.n; g++) {
            const dst = 4 * (index ? index[g] : g) + first;
            for (let ch = 0; ch < C; ch++) mean[dst + ch] = Math.fround(b.mean_offset[ch] + b.mean_scale[ch] * mq[g * C + ch]);
          }
          for (let k = 0; k < b.components; k++, layer++) {
            const z = b.basis_zero[k], row = k * b.n * C, bits = b.basis_bits[k];
            this.factor[a][layer] = Math.fround(Math.sqrt(lam[k])) * Math.fround(b.basis_scale[k]);
            this.zero[a][layer] = z;
            const q = new Uint8Array(N * C).fill(z);
            for (let g = 0; g < b.n; g++) {
              const dst = C * (index ? index[g] : g);
              for (let ch = 0; ch < C; ch++) q[dst + ch] = bq[row + g * C + ch];
            }
            quantised[a].push(q);
            this.units.push({ slot, attr: a, first, k: layer, bits });
          }
        });
      }));
      const planar = (a) => {  // the means of attribute a, [N, C]
        const [slot, first] = ATTR_SLOT[a], C = CHANNELS[a], out = new Float32Array(N * C);
        for (let g = 0; g < N; g++) for (let ch = 0; ch < C; ch++) out[C * g + ch] = means[slot][4 * g + first + ch];
        return out;
      };
      const onCpu = this.evalMode === "cpu" ? ATTRS : ["positions"];
      this.cpu = new CpuModel(N, Object.fromEntries(onCpu.map((a) => [a, { C: CHANNELS[a], mean: planar(a), rows: quantised[a] }])));
      this.a = Object.fromEntries(ATTRS.map((a) => [a, new Float32Array(this.components[a])]));  // a_k, per frame
      this.shift = Object.fromEntries(ATTRS.map((a) => [a, new Float32Array(CHANNELS[a])]));
      if (this.evalMode === "cpu") {
        this.gaussData = [0, 1, 2].map(() => new Float32Array(size));
        for (let g = 0; g < N; g++) this.gaussData[0][4 * g + 3] = 1;
      }
      const colors = new Uint8Array(TW * this.TH * 4), c = this.arrays.colors;
      for (let g = 0; g < this.N; g++) for (let ch = 0; ch < 3; ch++) colors[4 * g + ch] = c[3 * g + ch];
      this.colorTex = gl.createTexture();
      gl.bindTexture(gl.TEXTURE_2D, this.colorTex);
      gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA8, TW, this.TH, 0, gl.RGBA, gl.UNSIGNED_BYTE, colors);
      for (const p of [gl.TEXTURE_MIN_FILTER, gl.TEXTURE_MAG_FILTER]) gl.texParameteri(gl.TEXTURE_2D, p, gl.NEAREST);
      if (this.evalMode === "gpu") this._uploadPass(means, quantised);
    }

    // the evaluation pass's inputs: the bit-packed basis texture, the mean textures, the uniform buffer
    _uploadPass(means, quantised) {
      const gl = this.gl, size = TW * this.TH * 4, N = this.N;
      // first fit, widest units first: ~5% of the bits left empty
      const used = [];  // bits taken in each word
      for (const u of [...this.units].sort((x, y) => CHANNELS[y.attr] * y.bits - CHANNELS[x.attr] * x.bits)) {
        const width = CHANNELS[u.attr] * u.bits;
        u.word = used.findIndex((b) => b + width <= 32);
        if (u.word < 0) { u.word = used.length; used.push(0); }
        u.shift = used[u.word];
        used[u.word] += width;
      }
      this.texels = Math.max(1, Math.ceil(used.length / 4));
      const packed = new Uint32Array(size * this.texels);
      for (const u of this.units) {
        const C = CHANNELS[u.attr], q = quantised[u.attr][u.k], base = size * (u.word >> 2) + (u.word & 3);
        for (let g = 0; g < N; g++) {
          let v = 0;
          for (let ch = 0; ch < C; ch++) v |= q[C * g + ch] << (u.shift + ch * u.bits);
          packed[base + 4 * g] |= v;
        }
      }
      this.meanTex = means.map((m) => floatTexture(gl, TW, this.TH, m));
      this.basisTex = gl.createTexture();
      gl.bindTexture(gl.TEXTURE_2D_ARRAY, this.basisTex);
      gl.texImage3D(gl.TEXTURE_2D_ARRAY, 0, gl.RGBA32UI, TW, this.TH, this.texels, 0, gl.RGBA_INTEGER, gl.UNSIGNED_INT, packed);
      for (const p of [gl.TEXTURE_MIN_FILTER, gl.TEXTURE_MAG_FILTER]) gl.texParameteri(gl.TEXTURE_2D_ARRAY, p, gl.NEAREST);
      const vectors = Math.max(1, this.units.length), limit = gl.getParameter(gl.MAX_UNIFORM_BLOCK_SIZE) / 16 - 3;
      if (vectors > limit) throw new Error(`${vectors} basis components exceed this browser's ${limit} uniform vec4s; export fewer components (viewer.export_energy)`);
      this.coefData = new Float32Array(4 * vectors + 12);  // + uShift[3]
      this.coefBuffer = gl.createBuffer();
      gl.bindBuffer(gl.UNIFORM_BUFFER, this.coefBuffer);
      gl.bufferData(gl.UNIFORM_BUFFER, this.coefData.byteLength, gl.DYNAMIC_DRAW);
    }

    _targets() {
      const gl = this.gl;
      this.gaussTex = [0, 1, 2].map(() => floatTexture(gl, TW, this.TH, null));
      this.evalFbo = gl.createFramebuffer();
      gl.bindFramebuffer(gl.FRAMEBUFFER, this.evalFbo);
      this.gaussTex.forEach((t, i) => gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0 + i, gl.TEXTURE_2D, t, 0));
      gl.drawBuffers([gl.COLOR_ATTACHMENT0, gl.COLOR_ATTACHMENT1, gl.COLOR_ATTACHMENT2]);
      // the image accumulates in float: 8-bit blending would round at every one of a pixel's splats
      this.imageTex = floatTexture(gl, this.width, this.height, null, this.floatBlend ? gl.RGBA32F : gl.RGBA16F);
      this.imageFbo = gl.createFramebuffer();
      gl.bindFramebuffer(gl.FRAMEBUFFER, this.imageFbo);
      gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0, gl.TEXTURE_2D, this.imageTex, 0);
      if (gl.checkFramebufferStatus(gl.FRAMEBUFFER) !== gl.FRAMEBUFFER_COMPLETE) throw new Error("float render target unsupported");
      // the sorted order as a texture, not an instanced attribute: SwiftShader pays per instance
      this.orderTex = gl.createTexture();
      gl.bindTexture(gl.TEXTURE_2D, this.orderTex);
      gl.texImage2D(gl.TEXTURE_2D, 0, gl.R32UI, TW, this.TH, 0, gl.RED_INTEGER, gl.UNSIGNED_INT, null);
      for (const p of [gl.TEXTURE_MIN_FILTER, gl.TEXTURE_MAG_FILTER]) gl.texParameteri(gl.TEXTURE_2D, p, gl.NEAREST);
      this.emptyVao = gl.createVertexArray();
    }

    // ---- state

    setTrack(i) { this.track = i; this.setFrame(0); }

    setFrame(f) {
      const tr = this.tracks[this.track];
      this.frame = Math.max(0, Math.min(f, tr.frames - 1));
      this.coefficients.set(tr.coefficients.subarray(this.frame * this.nCoefficients, (this.frame + 1) * this.nCoefficients));
      this.pose = rigid(tr.R.subarray(9 * this.frame, 9 * this.frame + 9), tr.t.subarray(3 * this.frame, 3 * this.frame + 3));
      this.dirty = true;
    }

    setCoefficient(attr, k, value) { this.coefficients[this.offsets[attr] + k] = value; this.dirty = true; }

    mean() { this.coefficients.fill(0); this.dirty = true; }

    // world-to-camera of the orbit camera (row-major 4x4): the dataset camera turned about the head
    viewmat() {
      const V0 = this.V0, o = this.orbit;
      const Rc2w = [V0[0], V0[4], V0[8], V0[1], V0[5], V0[9], V0[2], V0[6], V0[10]]; // transpose of V0's rotation
      const eye = apply3(Rc2w, [-V0[3], -V0[7], -V0[11]]);
      const up = [-Rc2w[1], -Rc2w[4], -Rc2w[7]], right = [Rc2w[0], Rc2w[3], Rc2w[6]];
      const Rot = mul3(rotation(up, o.yaw), rotation(right, o.pitch));
      const rel = apply3(Rot, [0, 1, 2].map((i) => (eye[i] - this.target[i]) * o.zoom));
      const e = [0, 1, 2].map((i) => this.target[i] + rel[i]);
      const R = mul3(Rot, Rc2w);
      const Rw2c = [R[0], R[3], R[6], R[1], R[4], R[7], R[2], R[5], R[8]];
      const t = apply3(Rw2c, e).map((x) => -x);
      return rigid(Rw2c, t);
    }

    // ---- the three passes

    // value = mean + sum_k c_k sqrt(lambda_k) basis_k = mean + shift + sum_k a_k q_k, with a_k = c_k
    // sqrt(lambda_k) scale_k and shift = -sum_k a_k zero_k: the quantised rows as the file holds them. The CPU
    // model gives the positions (for the depth sort), and in "cpu" mode every attribute, uploaded; in
    // "gpu" mode the evaluation pass writes the Gaussians.
    evaluate() {
      for (const attr of ATTRS) {
        const a = this.a[attr], shift = this.shift[attr], o = this.offsets[attr];
        shift.fill(0);
        for (let k = 0; k < a.length; k++) {
          a[k] = Math.fround(this.coefficients[o + k] * this.factor[attr][k]);
          for (let ch = 0; ch < shift.length; ch++) shift[ch] -= a[k] * this.zero[attr][k];
        }
      }
      this.positions = this.cpu.evaluate("positions", this.a.positions, this.shift.positions);
      if (this.evalMode === "cpu") this._uploadGaussians(); else this._evaluationPass();
      this.dirty = false;
    }

    // the three textures of the evaluation pass, from the CPU model (normalised, clamped as the pass does)
    _uploadGaussians() {
      const gl = this.gl, N = this.N, [pos, rot, so] = this.gaussData, p = this.positions;
      const r = this.cpu.evaluate("rotations", this.a.rotations, this.shift.rotations);
      const s = this.cpu.evaluate("scales", this.a.scales, this.shift.scales);
      const o = this.cpu.evaluate("opacities", this.a.opacities, this.shift.opacities);
      for (let g = 0, g3 = 0, g4 = 0; g < N; g++, g3 += 3, g4 += 4) {
        pos[g4] = p[g3]; pos[g4 + 1] = p[g3 + 1]; pos[g4 + 2] = p[g3 + 2];
        const w = r[g4], x = r[g4 + 1], y = r[g4 + 2], z = r[g4 + 3];
        const n = Math.max(Math.sqrt(w * w + x * x + y * y + z * z), 1e-12);
        rot[g4] = w / n; rot[g4 + 1] = x / n; rot[g4 + 2] = y / n; rot[g4 + 3] = z / n;
        so[g4] = Math.max(s[g3], 0); so[g4 + 1] = Math.max(s[g3 + 1], 0); so[g4 + 2] = Math.max(s[g3 + 2], 0);
        so[g4 + 3] = Math.min(Math.max(o[g], 0), 1);
      }
      this.gaussTex.forEach((t, i) => {
        gl.bindTexture(gl.TEXTURE_2D, t);
        gl.texSubImage2D(gl.TEXTURE_2D, 0, 0, 0, TW, this.TH, gl.RGBA, gl.FLOAT, this.gaussData[i]);
      });
    }

    _evaluationPass() {
      const gl = this.gl, p = this.evalProgram, c = this.coefData;
      c.fill(0);
      const shift = 4 * Math.max(1, this.units.length);
      this.units.forEach((u, i) => c.fill(this.a[u.attr][u.k], 4 * i + u.first, 4 * i + u.first + CHANNELS[u.attr]));
      for (const attr of ATTRS) {
        const [slot, first] = ATTR_SLOT[attr];
        c.set(this.shift[attr], shift + 4 * slot + first);
      }
      gl.bindBuffer(gl.UNIFORM_BUFFER, this.coefBuffer);
      gl.bufferSubData(gl.UNIFORM_BUFFER, 0, c);
      gl.bindBufferBase(gl.UNIFORM_BUFFER, 0, this.coefBuffer);
      gl.useProgram(p.program);
      gl.uniformBlockBinding(p.program, gl.getUniformBlockIndex(p.program, "Coefficients"), 0);
      gl.bindFramebuffer(gl.FRAMEBUFFER, this.evalFbo);
      gl.viewport(0, 0, TW, this.TH);
      gl.disable(gl.BLEND);
      SLOTS.forEach((_, i) => {
        gl.activeTexture(gl.TEXTURE0 + i);
        gl.bindTexture(gl.TEXTURE_2D, this.meanTex[i]);
        gl.uniform1i(p.uniforms[`uMean${i}`], i);
      });
      gl.activeTexture(gl.TEXTURE3);
      gl.bindTexture(gl.TEXTURE_2D_ARRAY, this.basisTex);
      gl.uniform1i(p.uniforms.uBasis, 3);
      gl.bindVertexArray(this.emptyVao);
      gl.drawArrays(gl.TRIANGLES, 0, 3);
    }

    // the evaluated Gaussians as the splat pass reads them: [TW TH 4] x 3 (position + 1, quaternion wxyz,
    // scale + opacity), Gaussian g at texel g (for tests: both modes against Python)
    gaussians() {
      if (this.dirty) this.evaluate();
      const gl = this.gl, out = [];
      gl.bindFramebuffer(gl.FRAMEBUFFER, this.evalFbo);
      for (let i = 0; i < 3; i++) {
        gl.readBuffer(gl.COLOR_ATTACHMENT0 + i);
        const data = new Float32Array(TW * this.TH * 4);
        gl.readPixels(0, 0, TW, this.TH, gl.RGBA, gl.FLOAT, data);
        out.push(Array.from(data.subarray(0, 4 * this.N)));
      }
      return out;
    }

    // front to back in camera depth; a stable LSD radix sort of the float's bits (positive floats
    // order as their bits; Gaussians behind the camera go last, the splat shader drops them)
    sort(view) {
      const N = this.N, pos = this.positions, keys = this.keys;
      const m0 = view[8], m1 = view[9], m2 = view[10], m3 = view[11];
      for (let i = 0; i < N; i++) {
        const z = m0 * pos[3 * i] + m1 * pos[3 * i + 1] + m2 * pos[3 * i + 2] + m3;
        this.depth32[0] = z;
        keys[i] = z > 0 ? this.depthBits[0] : 0xffffffff;
        this.order[i] = i;
      }
      let src = this.order, dst = this.scratch, srcKeys = keys, dstKeys = this.scratchKeys;
      const counts = this.counts || (this.counts = new Uint32Array(65536));
      for (const shift of [0, 16]) {
        counts.fill(0);
        for (let i = 0; i < N; i++) counts[(srcKeys[i] >>> shift) & 0xffff]++;
        let sum = 0;
        for (let b = 0; b < 65536; b++) { const c = counts[b]; counts[b] = sum; sum += c; }
        for (let i = 0; i < N; i++) {
          const at = counts[(srcKeys[i] >>> shift) & 0xffff]++;
          dst[at] = src[i];
          dstKeys[at] = srcKeys[i];
        }
        [src, dst, srcKeys, dstKeys] = [dst, src, dstKeys, srcKeys];
      }
      const gl = this.gl;
      gl.bindTexture(gl.TEXTURE_2D, this.orderTex);
      gl.texSubImage2D(gl.TEXTURE_2D, 0, 0, 0, TW, this.TH, gl.RED_INTEGER, gl.UNSIGNED_INT, src);
    }

    splat(view) {
      const gl = this.gl, p = this.splatProgram;
      gl.bindFramebuffer(gl.FRAMEBUFFER, this.imageFbo);
      gl.viewport(0, 0, this.width, this.height);
      gl.clearColor(0, 0, 0, 0);
      gl.clear(gl.COLOR_BUFFER_BIT);
      gl.enable(gl.BLEND);
      // front to back ("under"): C += (1 - A) c alpha, A += (1 - A) alpha
      gl.blendFuncSeparate(gl.ONE_MINUS_DST_ALPHA, gl.ONE, gl.ONE_MINUS_DST_ALPHA, gl.ONE);
      gl.useProgram(p.program);
      ["uPos", "uRot", "uScaleOpacity"].forEach((name, i) => {
        gl.activeTexture(gl.TEXTURE0 + i);
        gl.bindTexture(gl.TEXTURE_2D, this.gaussTex[i]);
        gl.uniform1i(p.uniforms[name], i);
      });
      gl.activeTexture(gl.TEXTURE3);
      gl.bindTexture(gl.TEXTURE_2D, this.colorTex);
      gl.uniform1i(p.uniforms.uColor, 3);
      gl.activeTexture(gl.TEXTURE4);
      gl.bindTexture(gl.TEXTURE_2D, this.orderTex);
      gl.uniform1i(p.uniforms.uOrder, 4);
      gl.uniformMatrix4fv(p.uniforms.uView, true, Float32Array.from(view));
      gl.uniform4f(p.uniforms.uIntr, ...this.K);
      gl.uniform2f(p.uniforms.uSize, this.width, this.height);
      gl.uniform1f(p.uniforms.uHeight, this.height);
      gl.bindVertexArray(this.emptyVao);
      gl.drawArrays(gl.TRIANGLES, 0, 6 * this.N);
      gl.useProgram(this.backgroundProgram.program); // + T_final * background
      gl.uniform3f(this.backgroundProgram.uniforms.uBackground, ...this.background);
      gl.bindVertexArray(this.emptyVao);
      gl.drawArrays(gl.TRIANGLES, 0, 3);
      gl.disable(gl.BLEND);
      gl.bindFramebuffer(gl.FRAMEBUFFER, null);
      gl.useProgram(this.presentProgram.program);
      gl.activeTexture(gl.TEXTURE0);
      gl.bindTexture(gl.TEXTURE_2D, this.imageTex);
      gl.uniform1i(this.presentProgram.uniforms.uImage, 0);
      gl.drawArrays(gl.TRIANGLES, 0, 3);
    }

    // GEM space -> camera of the current frame: the orbit camera composed with the frame's GEM pose
    gemView() { return mul4(this.viewmat(), this.pose); }

    render() {
      if (this.dirty) this.evaluate();
      const view = this.gemView();
      this.sort(view);
      this.splat(view);
    }

    // the float image [H, W, 4] as it was composited, rows from the top
    capture() {
      const gl = this.gl, data = new Float32Array(this.width * this.height * 4);
      gl.bindFramebuffer(gl.FRAMEBUFFER, this.imageFbo);
      gl.readBuffer(gl.COLOR_ATTACHMENT0);
      gl.readPixels(0, 0, this.width, this.height, gl.RGBA, gl.FLOAT, data);
      const out = new Float32Array(data.length), row = this.width * 4;
      for (let i = 0; i < this.height; i++) out.set(data.subarray((this.height - 1 - i) * row, (this.height - i) * row), i * row);
      return out;
    }

    // capture() as base64 of its float32 bytes (for tests: playwright carries strings well)
    captureBase64() {
      const bytes = new Uint8Array(this.capture().buffer);
      let text = "";
      for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
      return btoa(text);
    }

    // ms per frame over n frames, the camera turning: animated re-evaluates the GEM every frame
    // (next frame of the track), static draws the Gaussians already evaluated
    benchmark(n, animated) {
      const tr = this.tracks[this.track], pixel = new Float32Array(4), gl = this.gl;
      this.render();
      const start = performance.now();
      for (let i = 0; i < n; i++) {
        if (animated) this.setFrame((this.frame + 1) % tr.frames);
        this.orbit.yaw += 0.002;
        this.render();
        gl.bindFramebuffer(gl.FRAMEBUFFER, this.imageFbo);
        gl.readPixels(0, 0, 1, 1, gl.RGBA, gl.FLOAT, pixel); // waits for the frame
      }
      return (performance.now() - start) / n;
    }
  }

  // ------------------------------------------------------------ page

  function slider(parent, label, min, max, step, value, oninput) {
    const row = document.createElement("div");
    row.className = "row";
    row.innerHTML = `<label title="${label}">${label}</label><input type="range" min="${min}" max="${max}" step="${step}" value="${value}"><span></span>`;
    const input = row.querySelector("input"), out = row.querySelector("span");
    const show = () => { out.textContent = Number(input.value).toFixed(2); };
    input.addEventListener("input", () => { show(); oninput(Number(input.value)); });
    show();
    parent.appendChild(row);
    return { input, set: (v) => { input.value = v; show(); } };
  }

  async function start() {
    const params = new URLSearchParams(location.search);
    const canvas = document.getElementById("canvas");
    const buffer = await inflate(decodeBase85(window.GEM_B85));
    const meta = unpack(buffer).meta;
    // rendered at the window's size (K scaled), not stretched: a 200-pixel training camera still looks sharp
    const fit = Math.min((window.innerHeight - 10) / meta.view.height, (window.innerWidth - 320) / meta.view.width);
    const scale = Number(params.get("scale")) || fit;
    const player = new Player(canvas, buffer, scale, params.get("eval") || "auto");
    window.GEM = player;
    const v = meta.viewer;
    document.getElementById("info").innerHTML =
      `<b>GEM</b> · ${player.N} Gaussians · components ${ATTRS.map((a) => player.components[a]).join("/")} · ` +
      `${player.floatBlend ? "fp32" : "fp16"} compositing · evaluated on the ` +
      (player.evalMode === "cpu" ? `CPU (${player.cpu.kernel})` : "GPU");

    const trackSelect = document.getElementById("track"), frame = document.getElementById("frame");
    const frameValue = document.getElementById("frame-value"), play = document.getElementById("play");
    player.tracks.forEach((t, i) => trackSelect.add(new Option(`${t.label} (${t.frames})`, i)));
    const sliders = [];
    const container = document.getElementById("sliders");
    for (const a of ATTRS) {
      const h = document.createElement("h3");
      h.textContent = a[0].toUpperCase() + a.slice(1);
      container.appendChild(h);
      let index = 0;
      meta.attributes[a].blocks.forEach((b) => {
        for (let k = 0; k < b.components; k++, index++) {
          if (k >= v.sliders) continue;
          const i = index;
          const s = slider(container, b.part === "all" ? `${k}` : `${b.part} ${k}`, -v.sigma, v.sigma, 0.01, 0,
                           (value) => { playing = false; play.textContent = "Play"; player.setCoefficient(a, i, value); });
          s.attr = a;
          s.index = i;
          sliders.push(s);
        }
      });
    }
    const syncSliders = () => sliders.forEach((s) => s.set(player.coefficients[player.offsets[s.attr] + s.index]));
    const showFrame = (f) => { player.setFrame(f); frame.value = player.frame; frameValue.textContent = player.frame; syncSliders(); };
    const showTrack = (i) => { player.setTrack(i); frame.max = player.tracks[i].frames - 1; showFrame(0); };

    let playing = false, playStart = 0, playFrom = 0;
    trackSelect.addEventListener("change", () => showTrack(Number(trackSelect.value)));
    frame.addEventListener("input", () => showFrame(Number(frame.value)));
    play.addEventListener("click", () => {
      playing = !playing;
      play.textContent = playing ? "Pause" : "Play";
      playStart = performance.now();
      playFrom = player.frame;
    });
    document.getElementById("mean").addEventListener("click", () => { player.mean(); syncSliders(); });
    document.getElementById("reset-view").addEventListener("click", () => { player.orbit = { yaw: 0, pitch: 0, zoom: 1 }; });

    let drag = null;
    canvas.addEventListener("pointerdown", (e) => { drag = [e.clientX, e.clientY]; canvas.setPointerCapture(e.pointerId); });
    canvas.addEventListener("pointerup", () => { drag = null; });
    canvas.addEventListener("pointermove", (e) => {
      if (!drag) return;
      player.orbit.yaw -= (e.clientX - drag[0]) * 0.01;
      player.orbit.pitch = Math.max(-1.4, Math.min(1.4, player.orbit.pitch + (e.clientY - drag[1]) * 0.01));
      drag = [e.clientX, e.clientY];
    });
    canvas.addEventListener("wheel", (e) => { e.preventDefault(); player.orbit.zoom *= Math.exp(e.deltaY * 0.001); }, { passive: false });

    showTrack(0);
    const fpsLabel = document.getElementById("fps");
    let frames = 0, since = performance.now();
    function loop(now) {
      if (playing) {
        const T = player.tracks[player.track].frames;
        const f = (playFrom + Math.floor((now - playStart) / 1000 * v.fps)) % T;
        if (f !== player.frame) showFrame(f);
      }
      player.render();
      frames++;
      if (now - since > 500) {
        fpsLabel.textContent = `${(1000 * frames / (now - since)).toFixed(1)} FPS`;
        frames = 0;
        since = now;
      }
      requestAnimationFrame(loop);
    }
    requestAnimationFrame(loop);
    window.GEM_UI = { showFrame, showTrack, play: () => play.click() };
    document.body.dataset.ready = "true";
  }

  window.GEM_FORMAT = { decodeBase85, unpack }; // the decoders, for tests against lib/viewer/compressed.py
  window.GEM_CPU = { CpuModel }; // for tests of both kernels against numpy

  start().catch((e) => {
    document.getElementById("error").textContent = String(e && e.stack || e);
    document.body.dataset.ready = "error";
    throw e;
  });
})();
