// The whole demo in one stack: a VPC over three zones, an ECS cluster, Cloud Map, and three
// Fargate services — the cloudmap-xds control plane, the demo servers it serves, and the demo
// clients that call them through it (reachable on /describe behind an NLB).
//
// It synthesizes with no credentials: no lookups, images named by ECR repository and tag.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Construct } from 'constructs';
import { CfnOutput, Duration, Fn, RemovalPolicy, Stack, StackProps, Validations } from 'aws-cdk-lib';
import * as ec2 from 'aws-cdk-lib/aws-ec2';
import * as ecr from 'aws-cdk-lib/aws-ecr';
import * as ecs from 'aws-cdk-lib/aws-ecs';
import * as elbv2 from 'aws-cdk-lib/aws-elasticloadbalancingv2';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as servicediscovery from 'aws-cdk-lib/aws-servicediscovery';
import { DemoConfig } from './config';

/** The Cloud Map calls cloudmap-xds makes (control-plane/src/cloudmap.rs), all read-only; `cloudmap-xds check`
 * prints the same list (tests/integration/test_check.py compares them). */
export const CONTROL_PLANE_ACTIONS = [
  'servicediscovery:DiscoverInstances',
  'servicediscovery:DiscoverInstancesRevision',
  'servicediscovery:ListNamespaces',
  'servicediscovery:ListServices',
  'servicediscovery:GetService',
  // Routing kept in Cloud Map (cloudmap-xds.routes / cloudmap-xds.subsets service attributes).
  'servicediscovery:GetServiceAttributes',
  // Services with 1,000 or more instances are read with these instead of one DiscoverInstances page.
  'servicediscovery:ListInstances',
  'servicediscovery:GetInstancesHealthStatus',
];

export const PORTS = { xds: 18000, server: 50051, client: 8080, nlb: 80 } as const;
export const CONTROL_PLANE_COUNT = 2;
/** The control plane's own DNS name: <service>.<private DNS namespace>. */
export const CONTROL_PLANE_DNS = { namespace: 'cloudmap-xds.internal', service: 'control-plane' } as const;
export const ENVOY_IMAGE = 'envoyproxy/envoy:v1.40-latest';
/** Where the control plane tells Envoy sidecars to listen (its --envoy-egress-port). */
export const ENVOY_EGRESS_PORT = 15001;

export interface DemoStackProps extends StackProps {
  readonly config: DemoConfig;
}

export class DemoStack extends Stack {
  private readonly zones: string[];

  constructor(scope: Construct, id: string, props: DemoStackProps) {
    super(scope, id, props);
    const { config } = props;
    // Three zones without a lookup: explicit names if given, else the region's first three
    // via Fn::GetAZs, resolved by CloudFormation at deploy time (see the `availabilityZones` getter).
    this.zones = config.availabilityZones ?? [0, 1, 2].map(i => Fn.select(i, Fn.getAzs()));

    const vpc = new ec2.Vpc(this, 'Vpc', {
      ipAddresses: ec2.IpAddresses.cidr('10.40.0.0/16'),
      maxAzs: this.zones.length,
      natGateways: Math.min(config.natGateways, this.zones.length),
      subnetConfiguration: [
        { name: 'public', subnetType: ec2.SubnetType.PUBLIC, cidrMask: 24 },
        { name: 'private', subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS, cidrMask: 20 },
      ],
    });
    if (config.availabilityZones) {
      Validations.of(this).acknowledge({ id: 'CloudFormation-Validate::W3010', reason: 'zones named on purpose (-c availabilityZones)' });
    }
    const cluster = new ecs.Cluster(this, 'Cluster', { vpc });

    const namespace = new servicediscovery.HttpNamespace(this, 'Namespace', {
      name: config.namespace,
      description: 'cloudmap-xds demo: services served over xDS',
    });
    const controlPlaneDns = new servicediscovery.PrivateDnsNamespace(this, 'ControlPlaneDns', {
      name: CONTROL_PLANE_DNS.namespace,
      vpc,
      description: 'cloudmap-xds demo: the control plane\'s own DNS name',
    });
    const controlPlaneHost = `${CONTROL_PLANE_DNS.service}.${CONTROL_PLANE_DNS.namespace}`;
    const controlPlaneAddress = `${controlPlaneHost}:${PORTS.xds}`;
    const xdsName = `${config.serviceName}.${config.namespace}`;

    const sg = (name: string, description: string) =>
      new ec2.SecurityGroup(this, `${name}Sg`, { vpc, description, allowAllOutbound: true });
    const controlPlaneSg = sg('ControlPlane', 'cloudmap-xds: ADS on 18000 from demo clients');
    const serverSg = sg('Server', 'demo-server: gRPC on 50051 from demo clients');
    const clientSg = sg('Client', 'demo-client: /describe on 8080 from the NLB');
    const nlbSg = sg('Nlb', 'NLB in front of demo-client: port 80 from the allowed CIDR only');
    controlPlaneSg.addIngressRule(clientSg, ec2.Port.tcp(PORTS.xds), 'ADS from demo clients');
    // The replicas watch one another's census on the xDS port (--peer-service).
    controlPlaneSg.addIngressRule(controlPlaneSg, ec2.Port.tcp(PORTS.xds), 'census from peer replicas');
    serverSg.addIngressRule(clientSg, ec2.Port.tcp(PORTS.server), 'gRPC from demo clients');
    clientSg.addIngressRule(nlbSg, ec2.Port.tcp(PORTS.client), '/describe from the NLB');
    const allowed = config.allowedCidr
      ? ec2.Peer.ipv4(config.allowedCidr)
      : ec2.Peer.ipv4(vpc.vpcCidrBlock);
    nlbSg.addIngressRule(allowed, ec2.Port.tcp(PORTS.nlb), '/describe from the allowed CIDR');

    const logGroup = (name: string) =>
      new logs.LogGroup(this, `${name}Logs`, {
        retention: logs.RetentionDays.ONE_WEEK,
        removalPolicy: RemovalPolicy.DESTROY,
      });
    const image = (repository: string) =>
      ecs.ContainerImage.fromEcrRepository(
        ecr.Repository.fromRepositoryName(this, `${repository}Repo`, repository),
        config.imageTag,
      );
    const taskDefinition = (name: string, cpu: number, memoryLimitMiB: number) =>
      new ecs.FargateTaskDefinition(this, `${name}Task`, {
        cpu,
        memoryLimitMiB,
        runtimePlatform: {
          cpuArchitecture: ecs.CpuArchitecture.X86_64,
          operatingSystemFamily: ecs.OperatingSystemFamily.LINUX,
        },
      });
    const service = (name: string, task: ecs.FargateTaskDefinition, desiredCount: number,
      securityGroup: ec2.SecurityGroup, extra: Partial<ecs.FargateServiceProps> = {}) =>
      new ecs.FargateService(this, name, {
        cluster,
        taskDefinition: task,
        desiredCount,
        securityGroups: [securityGroup],
        vpcSubnets: { subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS },
        minHealthyPercent: 100,
        maxHealthyPercent: 200,
        circuitBreaker: { enable: true, rollback: true },
        ...extra,
      });
    // A TCP connect from inside the container: the images have bash but no gRPC health probe.
    const tcpCheck = (port: number): ecs.HealthCheck => ({
      command: ['CMD', 'bash', '-c', `</dev/tcp/127.0.0.1/${port}`],
      interval: Duration.seconds(10),
      timeout: Duration.seconds(5),
      retries: 3,
      startPeriod: Duration.seconds(10),
    });

    // --- control plane ---------------------------------------------------------------------
    const controlPlaneLogs = logGroup('ControlPlane');
    const controlPlaneTask = taskDefinition('ControlPlane', 256, 512);
    controlPlaneTask.addToTaskRolePolicy(new iam.PolicyStatement({
      sid: 'ReadCloudMap',
      actions: CONTROL_PLANE_ACTIONS,
      // Discover* and List* have no resource-level permissions; all of these are reads.
      resources: ['*'],
    }));
    controlPlaneTask.addContainer('cloudmap-xds', {
      image: image('cloudmap-xds'),
      essential: true,
      portMappings: [{ containerPort: PORTS.xds, name: 'xds' }],
      environment: {
        CLOUDMAP_XDS_NAMESPACE: config.namespace,
        CLOUDMAP_XDS_LOG_FORMAT: 'json',
        // The replicas find one another in their own Cloud Map service (ECS registers each
        // task's IP there) and plan from the summed census of every replica's clients.
        CLOUDMAP_XDS_PEER_SERVICE: `${CONTROL_PLANE_DNS.service}.${CONTROL_PLANE_DNS.namespace}`,
        AWS_REGION: this.region,
        // The admin server stays on its default 127.0.0.1:9901: the health check below runs
        // inside the task's network namespace, so nothing outside needs to reach it.
        ...(config.envoySidecar ? { CLOUDMAP_XDS_ENVOY_EGRESS_PORT: String(ENVOY_EGRESS_PORT) } : {}),
      },
      healthCheck: {
        command: ['CMD', 'curl', '-fsS', 'http://127.0.0.1:9901/healthz'],
        interval: Duration.seconds(10),
        timeout: Duration.seconds(5),
        retries: 3,
        startPeriod: Duration.seconds(10),
      },
      logging: ecs.LogDrivers.awsLogs({ streamPrefix: 'cloudmap-xds', logGroup: controlPlaneLogs }),
    });
    service('ControlPlane', controlPlaneTask, CONTROL_PLANE_COUNT, controlPlaneSg, {
      // One A record per healthy task; ECS (de)registers them and reports task health.
      cloudMapOptions: {
        cloudMapNamespace: controlPlaneDns,
        name: CONTROL_PLANE_DNS.service,
        dnsRecordType: servicediscovery.DnsRecordType.A,
        dnsTtl: Duration.seconds(10),
      },
    });

    // --- demo servers ------------------------------------------------------------------------
    const serverLogs = logGroup('Server');
    const serverTask = taskDefinition('Server', 256, 512);
    serverTask.addContainer('demo-server', {
      image: image('demo-server'),
      essential: true,
      portMappings: [{ containerPort: PORTS.server, name: 'grpc' }],
      // The zone comes from ECS task metadata v4. demo_server=debug logs one line per Describe.
      environment: { AWS_REGION: this.region, RUST_LOG: 'info,demo_server=debug', NO_COLOR: '1' },
      healthCheck: tcpCheck(PORTS.server),
      logging: ecs.LogDrivers.awsLogs({ streamPrefix: 'demo-server', logGroup: serverLogs }),
    });
    const serverService = service('Server', serverTask, config.serverCount, serverSg);
    // ECS registers each task in the HTTP namespace with AWS_INSTANCE_IPV4, AWS_INSTANCE_PORT and
    // AVAILABILITY_ZONE, and keeps its Cloud Map health in step with the container health check.
    // (cloudMapOptions is DNS-only, hence the explicit registry with container name and port.)
    const echo = namespace.createService('Echo', {
      name: config.serviceName,
      description: 'demo-server tasks, registered by ECS',
      customHealthCheck: { failureThreshold: 1 },
    });
    (serverService.node.defaultChild as ecs.CfnService).serviceRegistries = [{
      registryArn: echo.serviceArn,
      containerName: 'demo-server',
      containerPort: PORTS.server,
    }];

    // --- demo clients ------------------------------------------------------------------------
    const clientLogs = logGroup('Client');
    const clientTask = config.envoySidecar
      ? taskDefinition('Client', 512, 1024)
      : taskDefinition('Client', 256, 512);
    clientTask.addContainer('demo-client', {
      image: image('demo-client'),
      essential: true,
      portMappings: [{ containerPort: PORTS.client, name: 'http' }],
      // The image's entrypoint writes the gRPC bootstrap with `cloudmap-xds bootstrap`, then starts.
      environment: {
        XDS_SERVER_URI: controlPlaneAddress,
        DEMO_TARGET: `xds:///${xdsName}`,
        DEMO_CLIENT_LISTEN: `0.0.0.0:${PORTS.client}`,
        AWS_REGION: this.region,
        NO_COLOR: '1',
      },
      healthCheck: tcpCheck(PORTS.client),
      logging: ecs.LogDrivers.awsLogs({ streamPrefix: 'demo-client', logGroup: clientLogs }),
    });
    if (config.envoySidecar) {
      const envoyDir = path.join(__dirname, '..', 'envoy');
      clientTask.addContainer('envoy', {
        image: ecs.ContainerImage.fromRegistry(ENVOY_IMAGE),
        essential: true,
        command: ['bash', '-c', fs.readFileSync(path.join(envoyDir, 'entrypoint.sh'), 'utf8'), 'envoy-entrypoint'],
        environment: {
          ENVOY_BOOTSTRAP_TEMPLATE: fs.readFileSync(path.join(envoyDir, 'bootstrap.yaml'), 'utf8'),
          XDS_HOST: controlPlaneHost,
          XDS_PORT: String(PORTS.xds),
          NODE_CLUSTER: 'demo-client',
          AWS_REGION: this.region,
        },
        healthCheck: tcpCheck(9902),
        logging: ecs.LogDrivers.awsLogs({ streamPrefix: 'envoy', logGroup: clientLogs }),
      });
    }
    const clientService = service('Client', clientTask, config.clientCount, clientSg);

    // An NLB: plain TCP to the tasks, a security group of its own, and no zone-crossing by default
    // (cross-zone load balancing is off), so each call starts in the zone it entered.
    // Its target health check is HTTP GET /healthz; /describe would make a gRPC call each time.
    // Without allowedCidr it stays internal.
    const nlb = new elbv2.NetworkLoadBalancer(this, 'Nlb', {
      vpc,
      internetFacing: config.allowedCidr !== undefined,
      vpcSubnets: { subnetType: config.allowedCidr ? ec2.SubnetType.PUBLIC : ec2.SubnetType.PRIVATE_WITH_EGRESS },
      securityGroups: [nlbSg],
    });
    nlb.addListener('Http', { port: PORTS.nlb, protocol: elbv2.Protocol.TCP }).addTargets('Clients', {
      port: PORTS.client,
      protocol: elbv2.Protocol.TCP,
      preserveClientIp: false,
      deregistrationDelay: Duration.seconds(10),
      healthCheck: {
        protocol: elbv2.Protocol.HTTP,
        path: '/healthz',
        interval: Duration.seconds(10),
        healthyThresholdCount: 2,
        unhealthyThresholdCount: 2,
      },
      targets: [clientService.loadBalancerTarget({ containerName: 'demo-client', containerPort: PORTS.client })],
    });

    new CfnOutput(this, 'DescribeUrl', {
      value: `http://${nlb.loadBalancerDnsName}/describe`,
      description: config.allowedCidr
        ? `GET it from ${config.allowedCidr}`
        : 'Internal NLB: GET it from inside the VPC (deploy with -c allowedCidr=YOUR.IP/32 to reach it)',
    });
    new CfnOutput(this, 'ControlPlaneAddress', { value: controlPlaneAddress, description: 'ADS server for xDS clients in the VPC' });
    new CfnOutput(this, 'NamespaceName', { value: config.namespace, description: 'Cloud Map HTTP namespace served' });
    new CfnOutput(this, 'XdsTarget', { value: `xds:///${xdsName}`, description: 'What clients dial' });
    new CfnOutput(this, 'ClusterName', { value: cluster.clusterName });
    new CfnOutput(this, 'ControlPlaneLogGroup', { value: controlPlaneLogs.logGroupName });
    new CfnOutput(this, 'ServerLogGroup', { value: serverLogs.logGroupName });
    new CfnOutput(this, 'ClientLogGroup', { value: clientLogs.logGroupName });
  }

  /** CDK's own choice would be a context lookup (needs credentials) or only two zones. */
  override get availabilityZones(): string[] {
    return this.zones;
  }
}
