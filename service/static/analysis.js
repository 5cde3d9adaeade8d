// Pure numerical helpers of the attention explorer: decoding arrays from the /embed response,
// the reference attention mask, PCA of the patch features and the viridis colour map.
// No DOM access here, so the functions can be checked against numpy oracles from a test.

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Converts one IEEE 754 half-precision bit pattern to a number. */
export function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x03ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function flattenNested(value, shape, out, depth) {
  if (Array.isArray(value)) {
    if (shape.length === depth) shape.push(value.length);
    else if (shape[depth] !== value.length) throw new Error("ragged nested array");
    for (const item of value) flattenNested(item, shape, out, depth + 1);
  } else {
    if (shape.length !== depth) throw new Error("ragged nested array");
    out.push(Number(value));
  }
}

/**
 * Decodes one array of the /embed response into {shape, data: Float32Array}.
 * Accepts the base64 form {dtype, shape, data} (little-endian raw bytes, float32 or float16)
 * and the JSON form (nested lists of numbers).
 */
export function decodeArray(value) {
  if (value === null || value === undefined) return null;
  if (Array.isArray(value)) {
    const shape = [];
    const flat = [];
    flattenNested(value, shape, flat, 0);
    return { shape, data: Float32Array.from(flat) };
  }
  if (typeof value === "object" && typeof value.data === "string") {
    const dtype = String(value.dtype || "float32").toLowerCase();
    const shape = (value.shape || []).map(Number);
    const count = shape.reduce((a, b) => a * b, 1);
    const bytes = base64ToBytes(value.data);
    let data;
    if (dtype === "float32") {
      if (bytes.length !== count * 4) {
        throw new Error(`expected ${count * 4} bytes, got ${bytes.length}`);
      }
      if (LITTLE_ENDIAN) {
        data = new Float32Array(bytes.buffer, bytes.byteOffset, count);
      } else {
        const view = new DataView(bytes.buffer);
        data = new Float32Array(count);
        for (let i = 0; i < count; i += 1) data[i] = view.getFloat32(i * 4, true);
      }
    } else if (dtype === "float16") {
      if (bytes.length !== count * 2) {
        throw new Error(`expected ${count * 2} bytes, got ${bytes.length}`);
      }
      const view = new DataView(bytes.buffer);
      data = new Float32Array(count);
      for (let i = 0; i < count; i += 1) data[i] = halfToFloat(view.getUint16(i * 2, true));
    } else {
      throw new Error(`unsupported dtype ${dtype}`);
    }
    return { shape, data };
  }
  if (typeof value === "object" && Array.isArray(value.data)) {
    // JSON encoding wrapped with its shape: {shape, data: nested or flat list}.
    const inner = decodeArray(value.data);
    if (Array.isArray(value.shape)) inner.shape = value.shape.map(Number);
    return inner;
  }
  throw new Error("unrecognised array encoding");
}

/**
 * The reference thresholded mask of DINO's visualize_attention.py for one attention map.
 * Sort the values ascending, normalise them to sum 1, take the cumulative sum and keep the
 * entries whose cumulative value is > 1 - fraction: the smallest set of the largest values that
 * holds about `fraction` of the attention mass.
 * @param {ArrayLike<number>} values attention of one head over the patches
 * @param {number} fraction mass to keep, in (0, 1]
 * @returns {Uint8Array} 1 for kept patches, in the original patch order
 */
export function attentionMask(values, fraction) {
  const n = values.length;
  const order = Array.from({ length: n }, (_, i) => i);
  order.sort((a, b) => values[a] - values[b] || a - b);
  let total = 0;
  for (let i = 0; i < n; i += 1) total += values[i];
  const mask = new Uint8Array(n);
  if (!(total > 0)) return mask;
  let cumulative = 0;
  for (let k = 0; k < n; k += 1) {
    cumulative += values[order[k]] / total;
    if (cumulative > 1 - fraction) mask[order[k]] = 1;
  }
  return mask;
}

/** Mean over heads of a [heads, patches] array given as a flat Float32Array. */
export function headMean(data, heads, patches) {
  const mean = new Float32Array(patches);
  for (let h = 0; h < heads; h += 1) {
    const offset = h * patches;
    for (let i = 0; i < patches; i += 1) mean[i] += data[offset + i];
  }
  for (let i = 0; i < patches; i += 1) mean[i] /= heads;
  return mean;
}

// Small deterministic generator so that the PCA start vectors, hence the result, are reproducible.
function seededRandom(seed) {
  let state = seed >>> 0;
  return () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 4294967296;
  };
}

/**
 * Principal components of the rows of a [n, d] matrix by power iteration with deflation on the
 * covariance matrix.
 * @param {Float32Array} features flat row-major [n, d]
 * @returns {{components: Float64Array[], eigenvalues: number[], projections: Float64Array[]}}
 *   components are unit vectors of length d (sign fixed so that the entry of largest magnitude is
 *   positive); projections[k][i] is the centred row i projected on component k.
 */
export function principalComponents(features, n, d, count = 3, maxIterations = 1000) {
  const mean = new Float64Array(d);
  for (let i = 0; i < n; i += 1) {
    const row = i * d;
    for (let j = 0; j < d; j += 1) mean[j] += features[row + j];
  }
  for (let j = 0; j < d; j += 1) mean[j] /= n;

  // Covariance [d, d], upper triangle accumulated row by row, then mirrored.
  const cov = new Float64Array(d * d);
  const centred = new Float64Array(d);
  for (let i = 0; i < n; i += 1) {
    const row = i * d;
    for (let j = 0; j < d; j += 1) centred[j] = features[row + j] - mean[j];
    for (let a = 0; a < d; a += 1) {
      const xa = centred[a];
      if (xa === 0) continue;
      const base = a * d;
      for (let b = a; b < d; b += 1) cov[base + b] += xa * centred[b];
    }
  }
  const scale = 1 / Math.max(n - 1, 1);
  for (let a = 0; a < d; a += 1) {
    for (let b = a; b < d; b += 1) {
      const value = cov[a * d + b] * scale;
      cov[a * d + b] = value;
      cov[b * d + a] = value;
    }
  }

  const random = seededRandom(12345);
  const components = [];
  const eigenvalues = [];
  const next = new Float64Array(d);
  for (let k = 0; k < Math.min(count, d); k += 1) {
    let vector = new Float64Array(d);
    for (let j = 0; j < d; j += 1) vector[j] = random() - 0.5;
    normalise(vector);
    let eigenvalue = 0;
    for (let iteration = 0; iteration < maxIterations; iteration += 1) {
      multiply(cov, vector, next, d);
      eigenvalue = 0;
      for (let j = 0; j < d; j += 1) eigenvalue += next[j] * next[j];
      eigenvalue = Math.sqrt(eigenvalue);
      if (!(eigenvalue > 0)) break;
      for (let j = 0; j < d; j += 1) next[j] /= eigenvalue;
      let agreement = 0;
      for (let j = 0; j < d; j += 1) agreement += next[j] * vector[j];
      vector.set(next);
      if (1 - Math.abs(agreement) < 1e-12) break;
    }
    fixSign(vector);
    // Rayleigh quotient for the eigenvalue, then deflate: C <- C - lambda v v^T.
    multiply(cov, vector, next, d);
    eigenvalue = 0;
    for (let j = 0; j < d; j += 1) eigenvalue += vector[j] * next[j];
    for (let a = 0; a < d; a += 1) {
      const scaled = eigenvalue * vector[a];
      const base = a * d;
      for (let b = 0; b < d; b += 1) cov[base + b] -= scaled * vector[b];
    }
    components.push(vector);
    eigenvalues.push(eigenvalue);
  }

  const projections = components.map(() => new Float64Array(n));
  for (let i = 0; i < n; i += 1) {
    const row = i * d;
    for (let k = 0; k < components.length; k += 1) {
      const component = components[k];
      let dot = 0;
      for (let j = 0; j < d; j += 1) dot += (features[row + j] - mean[j]) * component[j];
      projections[k][i] = dot;
    }
  }
  return { components, eigenvalues, projections };
}

function multiply(matrix, vector, out, d) {
  for (let a = 0; a < d; a += 1) {
    let sum = 0;
    const base = a * d;
    for (let b = 0; b < d; b += 1) sum += matrix[base + b] * vector[b];
    out[a] = sum;
  }
}

function normalise(vector) {
  let norm = 0;
  for (let j = 0; j < vector.length; j += 1) norm += vector[j] * vector[j];
  norm = Math.sqrt(norm);
  if (norm > 0) for (let j = 0; j < vector.length; j += 1) vector[j] /= norm;
}

function fixSign(vector) {
  let largest = 0;
  for (let j = 1; j < vector.length; j += 1) {
    if (Math.abs(vector[j]) > Math.abs(vector[largest])) largest = j;
  }
  if (vector[largest] < 0) for (let j = 0; j < vector.length; j += 1) vector[j] = -vector[j];
}

/**
 * RGB pixels of the first three principal components of the patch features: each component is
 * min-max scaled to 0..255 on its own. Missing components (d < 3) stay 0.
 * @returns {{rgba: Uint8ClampedArray, pca: object}} rgba is [n, 4]
 */
export function pcaRgb(features, n, d) {
  const pca = principalComponents(features, n, d, 3);
  const rgba = new Uint8ClampedArray(n * 4);
  for (let i = 0; i < n; i += 1) rgba[i * 4 + 3] = 255;
  pca.projections.forEach((projection, channel) => {
    let low = Infinity;
    let high = -Infinity;
    for (const value of projection) {
      if (value < low) low = value;
      if (value > high) high = value;
    }
    const range = high - low;
    for (let i = 0; i < n; i += 1) {
      rgba[i * 4 + channel] = range > 0 ? Math.round(((projection[i] - low) / range) * 255) : 0;
    }
  });
  return { rgba, pca };
}

// matplotlib's viridis at 0, 0.1, ..., 1 (plt.imsave's default colour map, as in the reference).
const VIRIDIS_STOPS = [
  [0x44, 0x01, 0x54], [0x48, 0x24, 0x75], [0x41, 0x44, 0x87], [0x35, 0x5f, 0x8d],
  [0x2a, 0x78, 0x8e], [0x21, 0x91, 0x8c], [0x22, 0xa8, 0x84], [0x44, 0xbf, 0x70],
  [0x7a, 0xd1, 0x51], [0xbd, 0xdf, 0x26], [0xfd, 0xe7, 0x25],
];

/** The viridis colour of t in [0, 1] as [r, g, b]. */
export function viridis(t) {
  const clamped = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0));
  const position = clamped * (VIRIDIS_STOPS.length - 1);
  const lower = Math.floor(position);
  const upper = Math.min(lower + 1, VIRIDIS_STOPS.length - 1);
  const weight = position - lower;
  return VIRIDIS_STOPS[lower].map((c, i) =>
    Math.round(c + (VIRIDIS_STOPS[upper][i] - c) * weight),
  );
}

/** CSS gradient of the colour map, for the legend. */
export function viridisGradient() {
  const stops = VIRIDIS_STOPS.map(
    ([r, g, b], i) => `rgb(${r}, ${g}, ${b}) ${(i * 100) / (VIRIDIS_STOPS.length - 1)}%`,
  );
  return `linear-gradient(to right, ${stops.join(", ")})`;
}

/** RGBA pixels of one map, min-max scaled on its own (like plt.imsave) and coloured by viridis. */
export function heatmapRgba(values) {
  let low = Infinity;
  let high = -Infinity;
  for (const value of values) {
    if (value < low) low = value;
    if (value > high) high = value;
  }
  const range = high - low;
  const rgba = new Uint8ClampedArray(values.length * 4);
  for (let i = 0; i < values.length; i += 1) {
    const [r, g, b] = viridis(range > 0 ? (values[i] - low) / range : 0);
    rgba.set([r, g, b, 255], i * 4);
  }
  return rgba;
}
