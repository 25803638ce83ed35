#!/usr/bin/env node
// Classifies one image with Marquee's ImageService.Classify and prints the top labels.
//
//   node classify.js <image> [--endpoint 127.0.0.1:8000] [--api-key KEY]
//                            [--model efficientnet_lite0] [--top-k 5] [--timeout 30]
//
// The .proto files are loaded from the repository's proto/ at run time (no generated code).
// Exit status: 0 on success, 1 on a gRPC or file error (printed as `error: CODE: message`),
// 2 on a usage error.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = process.env.MARQUEE_PROTO_DIR || path.resolve(__dirname, '..', '..', 'proto');
const USAGE =
  'usage: node classify.js <image> [--endpoint HOST:PORT] [--api-key KEY] ' +
  '[--model NAME] [--top-k N] [--timeout SECONDS]';

function fail(message, code = 1) {
  console.error(`error: ${message}`);
  process.exit(code);
}

function parseCommandLine() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        endpoint: { type: 'string', default: process.env.MARQUEE_ENDPOINT || '127.0.0.1:8000' },
        'api-key': { type: 'string', default: process.env.MARQUEE_API_KEY || '' },
        model: { type: 'string', default: 'efficientnet_lite0' },
        'top-k': { type: 'string', default: '5' },
        timeout: { type: 'string', default: '30' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (e) {
    fail(`${e.message}\n${USAGE}`, 2);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (positionals.length !== 1) fail(`expected one image file\n${USAGE}`, 2);
  const topK = Number(values['top-k']);
  if (!Number.isInteger(topK) || topK < 1) fail(`--top-k must be a whole number >= 1, got '${values['top-k']}'`, 2);
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) fail(`--timeout must be more than 0 seconds, got '${values.timeout}'`, 2);
  return {
    image: positionals[0],
    // grpc-js wants host:port; accept the CLI's http:// form too.
    endpoint: values.endpoint.replace(/^http:\/\//, '').replace(/\/$/, ''),
    apiKey: values['api-key'],
    model: values.model,
    topK,
    timeout,
  };
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || `CODE_${code}`;
}

function main() {
  const args = parseCommandLine();
  let encoded;
  try {
    encoded = fs.readFileSync(args.image);
  } catch (e) {
    fail(`cannot read '${args.image}': ${e.message}`);
  }

  const definition = protoLoader.loadSync('marquee/vision/v1/vision.proto', {
    includeDirs: [PROTO_DIR],
    keepCase: true, // field names as in the .proto: top_k, model_version
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const vision = grpc.loadPackageDefinition(definition).marquee.vision.v1;
  const client = new vision.ImageService(args.endpoint, grpc.credentials.createInsecure());

  const metadata = new grpc.Metadata();
  if (args.apiKey) metadata.set('x-api-key', args.apiKey);
  const request = { model: args.model, top_k: args.topK, image: { encoded } };
  const options = { deadline: Date.now() + args.timeout * 1000 };

  client.Classify(request, metadata, options, (err, response) => {
    client.close();
    if (err) fail(`${statusName(err.code)}: ${err.details || err.message}`);
    console.log(`${response.model} (version ${response.model_version || 'unknown'})`);
    for (const label of response.labels) {
      console.log(`  ${label.score.toFixed(3)}  ${label.name} (${label.index})`);
    }
  });
}

main();
