// Runs an exported de3bert model.onnx on ONNX Runtime for Node.js, as any JavaScript caller would.
//
//   node run.js MODEL.onnx FEEDS.json OUTPUTS.json
//
// FEEDS.json: a list of feeds, each {input name: {type: "int64" | "float32", dims: [...], data: [flat values]}};
// the token inputs, and any of the graph's optional inputs (threshold, patience, lam, max_layer) to override.
// OUTPUTS.json: {inputNames: the inputs the session lists, results: per feed, {output name: {type, dims, data}}}.
'use strict';

const fs = require('node:fs');
const ort = require('onnxruntime-node');

// int64 tensors take a BigInt64Array: JavaScript numbers are doubles
const ARRAYS = {int64: (data) => BigInt64Array.from(data, BigInt), float32: (data) => Float32Array.from(data)};

function tensor({type, dims, data}) {
  return new ort.Tensor(type, ARRAYS[type](data), dims);
}

async function main([model, feedsPath, outputsPath]) {
  // errors only: the optional inputs are initializers listed as inputs on purpose, which ONNX Runtime warns about
  const session = await ort.InferenceSession.create(model, {executionProviders: ['cpu'], intraOpNumThreads: 1,
                                                            logSeverityLevel: 3});
  const results = [];
  for (const feed of JSON.parse(fs.readFileSync(feedsPath, 'utf8'))) {
    const inputs = Object.fromEntries(Object.entries(feed).map(([name, value]) => [name, tensor(value)]));
    const outputs = await session.run(inputs);
    // NaN (an indicator the criterion has no value for) becomes null in JSON
    results.push(Object.fromEntries(Object.entries(outputs).map(
        ([name, value]) => [name, {type: value.type, dims: value.dims, data: Array.from(value.data, Number)}])));
  }
  fs.writeFileSync(outputsPath, JSON.stringify({inputNames: session.inputNames, results}));
}

main(process.argv.slice(2)).catch((error) => {
  console.error(error);
  process.exit(1);
});
