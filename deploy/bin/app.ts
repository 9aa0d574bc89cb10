// CDK entry point. Region and account come from the environment the CDK CLI sets
// (CDK_DEFAULT_REGION / CDK_DEFAULT_ACCOUNT, i.e. your AWS profile) or from `-c region=… -c account=…`;
// without credentials the stack is simply account-agnostic, and synth still works offline.
import { App } from 'aws-cdk-lib';
import { configFromContext } from '../lib/config';
import { DemoStack } from '../lib/stack';

const app = new App();
const context = (key: string): unknown => app.node.tryGetContext(key);
const text = (key: string): string | undefined => {
  const value = context(key);
  return typeof value === 'string' && value !== '' ? value : undefined;
};

new DemoStack(app, text('stackName') ?? 'CloudmapXdsDemo', {
  env: {
    account: text('account') ?? process.env.CDK_DEFAULT_ACCOUNT,
    region: text('region') ?? process.env.CDK_DEFAULT_REGION,
  },
  description: 'cloudmap-xds: xDS control plane for AWS Cloud Map, with demo servers and clients on ECS Fargate',
  config: configFromContext(context),
});
