// The two container entrypoint scripts, run for real with bash/sh against a fake ECS task
// metadata endpoint on 127.0.0.1 and stub binaries; the Envoy config they render is checked by
// the real Envoy (`envoy --mode validate`, binary from ENVOY_BIN, set by scripts/test-deploy.sh).
import { after, before, test } from 'node:test';
import * as assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
const deploy = path.join(__dirname, '..');
const template = fs.readFileSync(path.join(deploy, 'envoy', 'bootstrap.yaml'), 'utf8');
const taskArn = 'arn:aws:ecs:eu-west-3:123456789012:task/demo/0123456789abcdef';

let metadata: http.Server;
let metadataUri: string;
let work: string;

before(async () => {
  // What ECS serves at ${ECS_CONTAINER_METADATA_URI_V4}/task (abridged).
  metadata = http.createServer((req, res) => {
    if (req.url !== '/v4/container-1/task') {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ Cluster: 'demo', TaskARN: taskArn, Family: 'client', AvailabilityZone: 'eu-west-3b', LaunchType: 'FARGATE' }, null, 2));
  });
  await new Promise<void>(resolve => metadata.listen(0, '127.0.0.1', resolve));
  metadataUri = `http://127.0.0.1:${(metadata.address() as AddressInfo).port}/v4/container-1`;
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'entrypoints-'));
  // Stubs that record their arguments (one per line) and environment instead of running.
  for (const name of ['envoy', 'cloudmap-xds', 'demo-client']) {
    fs.writeFileSync(path.join(work, name),
      `#!/bin/sh\nprintf '%s\\n' "$@" > "${work}/${name}.args"\nenv > "${work}/${name}.env"\n`, { mode: 0o755 });
  }
});

after(() => {
  metadata.close();
  fs.rmSync(work, { recursive: true, force: true });
});

const stubEnv = (extra: Record<string, string>) => ({ PATH: `${work}:${process.env.PATH}`, HOME: work, ...extra });
const recorded = (name: string) => fs.readFileSync(path.join(work, `${name}.args`), 'utf8').split('\n').slice(0, -1);

/** Runs deploy/envoy/entrypoint.sh as the task definition does, returns the rendered config. */
async function renderEnvoy(extra: Record<string, string>): Promise<string> {
  const script = fs.readFileSync(path.join(deploy, 'envoy', 'entrypoint.sh'), 'utf8');
  await run('bash', ['-c', script, 'envoy-entrypoint', '--log-level', 'info'], {
    env: stubEnv({ ENVOY_BOOTSTRAP_TEMPLATE: template, XDS_HOST: 'control-plane.cloudmap-xds.internal', ...extra }),
  });
  const args = fs.readFileSync(path.join(work, 'envoy.args'), 'utf8');
  assert.ok(args.startsWith('--config-yaml\n'), args);
  assert.ok(args.endsWith('\n--log-level\ninfo\n'), 'extra arguments reach envoy');
  return args.slice('--config-yaml\n'.length, -'\n--log-level\ninfo\n'.length);
}

test('the Envoy entrypoint fills in zone, region and node id from ECS task metadata', async () => {
  const config = await renderEnvoy({ ECS_CONTAINER_METADATA_URI_V4: metadataUri });
  assert.match(config, /zone: "eu-west-3b"/);
  assert.match(config, /region: "eu-west-3"/);
  assert.ok(config.includes(`id: "${taskArn}"`));
  assert.match(config, /cluster: "demo-client"/);
  assert.match(config, /address: "control-plane\.cloudmap-xds\.internal", port_value: 18000 /);
  assert.doesNotMatch(config, /@[A-Z_]+@/, 'no placeholder left');
});

test('the rendered Envoy bootstrap is valid for Envoy 1.40', async () => {
  const envoy = process.env.ENVOY_BIN;
  assert.ok(envoy, 'ENVOY_BIN must name an envoy binary (scripts/test-deploy.sh installs one into .peers/cfn)');
  const config = await renderEnvoy({ ECS_CONTAINER_METADATA_URI_V4: metadataUri, AWS_REGION: 'eu-west-3' });
  const { stdout, stderr } = await run(envoy, ['--mode', 'validate', '--config-yaml', config, '--log-level', 'warn']);
  assert.match(stdout + stderr, /configuration .* OK/);
  assert.doesNotMatch(stdout + stderr, /Deprecated field/i, 'no field that a later Envoy drops');
  const version = await run(envoy, ['--version']);
  assert.match(version.stdout, /\/1\.40\./, 'the same minor as the image the stack runs');
});

test('the Envoy entrypoint refuses to start without a zone', async () => {
  await assert.rejects(renderEnvoy({}), (err: any) => {
    assert.match(err.stderr, /set ENVOY_ZONE, or run on ECS/);
    return true;
  });
});

test('ENVOY_ZONE skips the metadata lookup', async () => {
  const config = await renderEnvoy({ ENVOY_ZONE: 'us-west-2c', ENVOY_NODE_ID: 'envoy-7' });
  assert.match(config, /zone: "us-west-2c"/);
  assert.match(config, /region: "us-west-2"/);
  assert.match(config, /id: "envoy-7"/);
});

test('the demo-client entrypoint writes the bootstrap, then serves through it', async () => {
  await run('sh', [path.join(deploy, 'docker', 'demo-client-entrypoint.sh'), '--timeout', '1s'], {
    env: stubEnv({ XDS_SERVER_URI: 'control-plane.cloudmap-xds.internal:18000', DEMO_TARGET: 'xds:///echo.shop' }),
  });
  assert.deepEqual(recorded('cloudmap-xds'),
    ['bootstrap', '--server-uri', 'control-plane.cloudmap-xds.internal:18000', '--output', '/tmp/bootstrap.json']);
  assert.deepEqual(recorded('demo-client'),
    ['serve', '--listen', '0.0.0.0:8080', '--target', 'xds:///echo.shop', '--timeout', '1s']);
  const env = fs.readFileSync(path.join(work, 'demo-client.env'), 'utf8');
  assert.match(env, /^GRPC_XDS_BOOTSTRAP=\/tmp\/bootstrap\.json$/m);
});

test('the demo-client entrypoint needs the control plane address', async () => {
  await assert.rejects(run('sh', [path.join(deploy, 'docker', 'demo-client-entrypoint.sh')], { env: stubEnv({}) }),
    (err: any) => /XDS_SERVER_URI/.test(err.stderr));
});
