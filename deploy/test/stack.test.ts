// Assertions on the synthesized template: least-privilege IAM, who may reach which port, health
// checks, three zones, task counts, log retention. No AWS access: everything is offline synth.
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { App, Environment } from 'aws-cdk-lib';
import { Template } from 'aws-cdk-lib/assertions';
import { configFromContext } from '../lib/config';
import { DemoStack, ENVOY_IMAGE, PORTS } from '../lib/stack';

type Resources = Record<string, { Type: string; Properties?: any; DependsOn?: unknown }>;

// The feature flags of cdk.json, so tests synthesize as `cdk synth` does (and fail on
// CDK's built-in template validation, which cdk.json turns into errors).
const flags = JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'cdk.json'), 'utf8')).context;

function synth(context: Record<string, unknown> = {}, env?: Environment) {
  const app = new App({ context: flags });
  const stack = new DemoStack(app, 'Test', { env, config: configFromContext(key => context[key]) });
  const template = Template.fromStack(stack);
  return { app, stack, template, resources: template.toJSON().Resources as Resources };
}

const ofType = (resources: Resources, type: string) =>
  Object.entries(resources).filter(([, r]) => r.Type === type);

/** The container definitions of every task definition, by container name. */
function containers(resources: Resources): Record<string, any> {
  const byName: Record<string, any> = {};
  for (const [, task] of ofType(resources, 'AWS::ECS::TaskDefinition')) {
    for (const c of task.Properties.ContainerDefinitions) byName[c.Name] = { ...c, task };
  }
  return byName;
}

const envOf = (container: any): Record<string, string> =>
  Object.fromEntries((container.Environment ?? []).map((e: any) => [e.Name, e.Value]));

/** Logical id of the task definition running `containerName`. */
function taskOf(resources: Resources, containerName: string): string {
  const found = ofType(resources, 'AWS::ECS::TaskDefinition').find(([, t]) =>
    t.Properties.ContainerDefinitions.some((c: any) => c.Name === containerName));
  assert.ok(found, `no task definition runs ${containerName}`);
  return found[0];
}

/** The ECS service running `containerName`. */
function serviceOf(resources: Resources, containerName: string): any {
  const task = taskOf(resources, containerName);
  const found = ofType(resources, 'AWS::ECS::Service').find(([, s]) => s.Properties.TaskDefinition.Ref === task);
  assert.ok(found, `no service runs ${containerName}`);
  return found[1];
}

interface Ingress { group: string; from: number; to: number; cidr?: unknown; sourceGroup?: string }

/** Every ingress rule, inline or standalone, keyed by the logical id of the group it opens. */
function ingressRules(resources: Resources): Ingress[] {
  const rules: Ingress[] = [];
  const sourceOf = (rule: any) => rule.SourceSecurityGroupId?.['Fn::GetAtt']?.[0];
  for (const [id, sg] of ofType(resources, 'AWS::EC2::SecurityGroup')) {
    for (const rule of sg.Properties.SecurityGroupIngress ?? []) {
      rules.push({ group: id, from: rule.FromPort, to: rule.ToPort, cidr: rule.CidrIp ?? rule.CidrIpv6, sourceGroup: sourceOf(rule) });
    }
  }
  for (const [, rule] of ofType(resources, 'AWS::EC2::SecurityGroupIngress')) {
    const p = rule.Properties;
    rules.push({ group: p.GroupId['Fn::GetAtt'][0], from: p.FromPort, to: p.ToPort, cidr: p.CidrIp ?? p.CidrIpv6, sourceGroup: sourceOf(p) });
  }
  return rules;
}

/** Logical id of the security group of the service running `containerName`. */
function groupOf(resources: Resources, containerName: string): string {
  const groups = serviceOf(resources, containerName).Properties.NetworkConfiguration.AwsvpcConfiguration.SecurityGroups;
  assert.equal(groups.length, 1);
  return groups[0]['Fn::GetAtt'][0];
}

function nlbGroup(resources: Resources): string {
  const [[, nlb]] = ofType(resources, 'AWS::ElasticLoadBalancingV2::LoadBalancer');
  return nlb.Properties.SecurityGroups[0]['Fn::GetAtt'][0];
}

test('the control plane task role may only read Cloud Map', () => {
  const { resources } = synth();
  const task = resources[taskOf(resources, 'cloudmap-xds')];
  const role = task.Properties.TaskRoleArn['Fn::GetAtt'][0];
  assert.equal(resources[role].Properties.ManagedPolicyArns, undefined, 'no managed policies');
  assert.equal(resources[role].Properties.Policies, undefined, 'no inline policies');

  const statements = ofType(resources, 'AWS::IAM::Policy')
    .filter(([, p]) => p.Properties.Roles.some((r: any) => r.Ref === role))
    .flatMap(([, p]) => p.Properties.PolicyDocument.Statement);
  assert.ok(statements.length > 0, 'the task role has a policy');
  const actions = statements.flatMap((s: any) => [s.Action].flat());
  assert.ok(statements.every((s: any) => s.Effect === 'Allow' && s.NotAction === undefined));
  // The calls in control-plane/src/cloudmap.rs, and nothing else.
  assert.deepEqual([...actions].sort(), [
    'servicediscovery:DiscoverInstances',
    'servicediscovery:DiscoverInstancesRevision',
    'servicediscovery:GetInstancesHealthStatus',
    'servicediscovery:GetService',
    'servicediscovery:GetServiceAttributes',
    'servicediscovery:ListInstances',
    'servicediscovery:ListNamespaces',
    'servicediscovery:ListServices',
  ]);
  for (const action of actions) {
    assert.ok(!action.includes('*'), `wildcard action ${action}`);
    assert.match(action, /^servicediscovery:(Discover|List|Get)[A-Za-z]+$/, `not a read action: ${action}`);
  }
});

test('no policy in the stack grants a wildcard action', () => {
  const { resources } = synth({ envoySidecar: 'true' });
  for (const [id, policy] of ofType(resources, 'AWS::IAM::Policy')) {
    for (const statement of policy.Properties.PolicyDocument.Statement) {
      for (const action of [statement.Action].flat()) {
        assert.ok(!/(^|:)\*$/.test(action), `${id} grants ${action}`);
      }
    }
  }
});

test('ADS (18000) and gRPC (50051) are open only to the demo clients\' security group (and 18000 to peer replicas)', () => {
  const { resources } = synth({ allowedCidr: '203.0.113.7/32' });
  const rules = ingressRules(resources);
  const client = groupOf(resources, 'demo-client');
  const server = groupOf(resources, 'demo-server');
  assert.deepEqual(rules.filter(r => r.group === server),
    [{ group: server, from: PORTS.server, to: PORTS.server, cidr: undefined, sourceGroup: client }]);
  const controlPlane = groupOf(resources, 'cloudmap-xds');
  const open = rules.filter(r => r.group === controlPlane);
  const sorted = (rs: Ingress[]) => [...rs].sort((a, b) => String(a.sourceGroup).localeCompare(String(b.sourceGroup)));
  assert.deepEqual(sorted(open), sorted([
    { group: controlPlane, from: PORTS.xds, to: PORTS.xds, cidr: undefined, sourceGroup: client },
    { group: controlPlane, from: PORTS.xds, to: PORTS.xds, cidr: undefined, sourceGroup: controlPlane },
  ]));
});

test('the control plane replicas find one another in their own Cloud Map service', () => {
  const { resources } = synth();
  const all = containers(resources);
  assert.equal(envOf(all['cloudmap-xds']).CLOUDMAP_XDS_PEER_SERVICE, 'control-plane.cloudmap-xds.internal');
  const [[own]] = ofType(resources, 'AWS::ServiceDiscovery::Service').filter(([, s]) => s.Properties.Name === 'control-plane');
  assert.deepEqual(serviceOf(resources, 'cloudmap-xds').Properties.ServiceRegistries?.[0]?.RegistryArn, { 'Fn::GetAtt': [own, 'Arn'] });
});

test('/describe is reachable only from allowedCidr, through an internet-facing NLB', () => {
  const { resources, template } = synth({ allowedCidr: '203.0.113.7/32' });
  const rules = ingressRules(resources);
  const nlb = nlbGroup(resources);
  assert.deepEqual(rules.filter(r => r.group === nlb),
    [{ group: nlb, from: PORTS.nlb, to: PORTS.nlb, cidr: '203.0.113.7/32', sourceGroup: undefined }]);
  const client = groupOf(resources, 'demo-client');
  assert.deepEqual(rules.filter(r => r.group === client),
    [{ group: client, from: PORTS.client, to: PORTS.client, cidr: undefined, sourceGroup: nlb }]);
  template.hasResourceProperties('AWS::ElasticLoadBalancingV2::LoadBalancer', { Scheme: 'internet-facing', Type: 'network' });
  assert.ok(!rules.some(r => r.cidr === '0.0.0.0/0' || r.cidr === '::/0'), 'nothing is open to the world');
});

test('without allowedCidr the NLB is internal and admits only the VPC', () => {
  const { resources, template } = synth();
  const nlb = nlbGroup(resources);
  const [vpc] = ofType(resources, 'AWS::EC2::VPC')[0];
  assert.deepEqual(ingressRules(resources).filter(r => r.group === nlb),
    [{ group: nlb, from: PORTS.nlb, to: PORTS.nlb, cidr: { 'Fn::GetAtt': [vpc, 'CidrBlock'] }, sourceGroup: undefined }]);
  template.hasResourceProperties('AWS::ElasticLoadBalancingV2::LoadBalancer', { Scheme: 'internal' });
});

test('every container has a health check, and Cloud Map follows task health', () => {
  const { resources, template } = synth({ envoySidecar: 'true' });
  const all = containers(resources);
  assert.deepEqual(Object.keys(all).sort(), ['cloudmap-xds', 'demo-client', 'demo-server', 'envoy']);
  for (const [name, c] of Object.entries(all)) assert.ok(c.HealthCheck?.Command?.length, `${name} has a health check`);
  assert.deepEqual(all['cloudmap-xds'].HealthCheck.Command, ['CMD', 'curl', '-fsS', 'http://127.0.0.1:9901/healthz']);
  assert.deepEqual(all['demo-server'].HealthCheck.Command, ['CMD', 'bash', '-c', `</dev/tcp/127.0.0.1/${PORTS.server}`]);
  assert.deepEqual(all['demo-client'].HealthCheck.Command, ['CMD', 'bash', '-c', `</dev/tcp/127.0.0.1/${PORTS.client}`]);

  // Both Cloud Map services take their health from ECS (custom health checks).
  const sd = ofType(resources, 'AWS::ServiceDiscovery::Service');
  assert.equal(sd.length, 2);
  for (const [, s] of sd) assert.deepEqual(s.Properties.HealthCheckCustomConfig, { FailureThreshold: 1 });
  template.hasResourceProperties('AWS::ElasticLoadBalancingV2::TargetGroup', {
    Port: PORTS.client, Protocol: 'TCP', TargetType: 'ip', HealthCheckProtocol: 'HTTP', HealthCheckPath: '/healthz',
  });
});

test('ECS registers demo servers in the HTTP namespace with their gRPC port', () => {
  const { resources, template } = synth({ namespace: 'shop' });
  template.hasResourceProperties('AWS::ServiceDiscovery::HttpNamespace', { Name: 'shop' });
  const [[echoId]] = ofType(resources, 'AWS::ServiceDiscovery::Service').filter(([, s]) => s.Properties.Name === 'echo');
  assert.equal(resources[echoId].Properties.DnsConfig, undefined, 'an HTTP (API-only) service');
  assert.deepEqual(serviceOf(resources, 'demo-server').Properties.ServiceRegistries, [
    { ContainerName: 'demo-server', ContainerPort: PORTS.server, RegistryArn: { 'Fn::GetAtt': [echoId, 'Arn'] } },
  ]);
  const all = containers(resources);
  assert.equal(envOf(all['cloudmap-xds']).CLOUDMAP_XDS_NAMESPACE, 'shop');
  assert.equal(envOf(all['demo-client']).DEMO_TARGET, 'xds:///echo.shop');
});

test('the control plane has one DNS name with an A record per task', () => {
  const { resources, template } = synth();
  template.hasResourceProperties('AWS::ServiceDiscovery::PrivateDnsNamespace', { Name: 'cloudmap-xds.internal' });
  template.hasResourceProperties('AWS::ServiceDiscovery::Service', {
    Name: 'control-plane',
    DnsConfig: { DnsRecords: [{ Type: 'A', TTL: 10 }], RoutingPolicy: 'MULTIVALUE' },
  });
  const all = containers(resources);
  assert.equal(envOf(all['demo-client']).XDS_SERVER_URI, 'control-plane.cloudmap-xds.internal:18000');
  assert.equal(envOf(all['cloudmap-xds']).CLOUDMAP_XDS_ADMIN_LISTEN, undefined, 'admin stays on loopback');
  template.hasOutput('ControlPlaneAddress', { Value: 'control-plane.cloudmap-xds.internal:18000' });
  template.hasOutput('DescribeUrl', {});
  template.hasOutput('NamespaceName', { Value: 'demo' });
});

test('the VPC spans three zones with a public and a private subnet in each, without lookups', () => {
  // A concrete account and region would make CDK look the zones up; the stack must not.
  const { app, resources } = synth({}, { account: '123456789012', region: 'eu-west-3' });
  assert.equal(app.synth().manifest.missing, undefined, 'no context lookups');
  const subnets = ofType(resources, 'AWS::EC2::Subnet').map(([, s]) => s.Properties);
  assert.equal(subnets.length, 6);
  const zones = (isPublic: boolean) =>
    new Set(subnets.filter(s => s.MapPublicIpOnLaunch === isPublic).map(s => JSON.stringify(s.AvailabilityZone)));
  assert.equal(zones(true).size, 3);
  assert.equal(zones(false).size, 3);
  assert.deepEqual([...zones(false)].sort(), [0, 1, 2].map(i => JSON.stringify({ 'Fn::Select': [i, { 'Fn::GetAZs': '' }] })));
  for (const service of ofType(resources, 'AWS::ECS::Service')) {
    assert.equal(service[1].Properties.NetworkConfiguration.AwsvpcConfiguration.Subnets.length, 3);
  }
});

test('explicit availabilityZones are used as given', () => {
  const { resources } = synth({ availabilityZones: 'ap-northeast-1a,ap-northeast-1c,ap-northeast-1d' }, { region: 'ap-northeast-1' });
  const zones = new Set(ofType(resources, 'AWS::EC2::Subnet').map(([, s]) => s.Properties.AvailabilityZone));
  assert.deepEqual([...zones].sort(), ['ap-northeast-1a', 'ap-northeast-1c', 'ap-northeast-1d']);
});

test('Fargate services run 2 control planes, 6 servers and 3 clients by default', () => {
  const { resources } = synth();
  assert.equal(serviceOf(resources, 'cloudmap-xds').Properties.DesiredCount, 2);
  assert.equal(serviceOf(resources, 'demo-server').Properties.DesiredCount, 6);
  assert.equal(serviceOf(resources, 'demo-client').Properties.DesiredCount, 3);
  for (const [, s] of ofType(resources, 'AWS::ECS::Service')) assert.equal(s.Properties.LaunchType, 'FARGATE');
  const counts = synth({ serverCount: '9', clientCount: 6 }).resources;
  assert.equal(serviceOf(counts, 'demo-server').Properties.DesiredCount, 9);
  assert.equal(serviceOf(counts, 'demo-client').Properties.DesiredCount, 6);
});

test('every container logs to a CloudWatch log group kept for one week', () => {
  const { resources } = synth({ envoySidecar: 'true' });
  const groups = ofType(resources, 'AWS::Logs::LogGroup');
  assert.equal(groups.length, 3);
  for (const [, g] of groups) assert.equal(g.Properties.RetentionInDays, 7);
  for (const [name, c] of Object.entries(containers(resources))) {
    assert.equal(c.LogConfiguration.LogDriver, 'awslogs', name);
    const group = c.LogConfiguration.Options['awslogs-group'].Ref;
    assert.equal(resources[group]?.Type, 'AWS::Logs::LogGroup', `${name} logs to a group of this stack`);
  }
});

test('images come from this account\'s ECR repositories at the given tag', () => {
  const { resources } = synth({ imageTag: 'v1.2.3' });
  for (const [name, c] of Object.entries(containers(resources))) {
    const image = JSON.stringify(c.Image);
    assert.ok(image.includes(`/${name}:v1.2.3`) || image.includes(`${name}:v1.2.3`), `${name}: ${image}`);
  }
});

test('the Envoy sidecar is off by default and, when on, runs the example bootstrap', () => {
  assert.equal(containers(synth().resources).envoy, undefined);
  const { resources } = synth({ envoySidecar: true });
  const envoy = containers(resources).envoy;
  assert.equal(envoy.Image, ENVOY_IMAGE);
  assert.deepEqual(envoy.Command.slice(0, 2), ['bash', '-c']);
  assert.equal(envoy.Command[2], fs.readFileSync(path.join(__dirname, '..', 'envoy', 'entrypoint.sh'), 'utf8'));
  const env = envOf(envoy);
  assert.equal(env.ENVOY_BOOTSTRAP_TEMPLATE, fs.readFileSync(path.join(__dirname, '..', 'envoy', 'bootstrap.yaml'), 'utf8'));
  assert.equal(env.XDS_HOST, 'control-plane.cloudmap-xds.internal');
  assert.equal(env.XDS_PORT, '18000');
  assert.equal(envOf(containers(resources)['cloudmap-xds']).CLOUDMAP_XDS_ENVOY_EGRESS_PORT, '15001');
  assert.equal(envoy.task, containers(resources)['demo-client'].task, 'a sidecar of demo-client');
});

test('bad context values fail synth with a message naming the key', () => {
  const read = (context: Record<string, unknown>) => () => configFromContext(key => context[key]);
  assert.throws(read({ allowedCidr: '0.0.0.0' }), /allowedCidr/);
  assert.throws(read({ allowedCidr: '300.1.1.1/32' }), /allowedCidr/);
  assert.throws(read({ envoySidecar: 'yes' }), /envoySidecar/);
  assert.throws(read({ namespace: 'Demo_1' }), /namespace/);
  assert.throws(read({ serverCount: '0' }), /serverCount/);
  assert.throws(read({ availabilityZones: 'us-east-1a' }), /availabilityZones/);
  assert.equal(configFromContext(() => undefined).allowedCidr, undefined, 'no default CIDR');
});
