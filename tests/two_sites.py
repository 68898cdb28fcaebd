"""A small Pyro model and guide with two latent sites that several math test files share."""

import pyro
import pyro.distributions as dist
import torch


class TwoSiteGuide(torch.nn.Module):
    """q(z1|x) q(z2|z1): z1 ~ N(a·x, softplus(s)), z2 ~ N(b·z1, softplus(t)); p(z1) p(z2|z1) p(x|z2)."""

    def __init__(self):
        super().__init__()
        self.a, self.s = torch.nn.Parameter(torch.tensor(0.7)), torch.nn.Parameter(torch.tensor(-0.3))
        self.b, self.t = torch.nn.Parameter(torch.tensor(1.3)), torch.nn.Parameter(torch.tensor(0.2))

    def model(self, x):
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
            pyro.sample("x", dist.Normal(z2, 1.0), obs=x)

    def guide(self, x):
        softplus = torch.nn.functional.softplus
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z1", dist.Normal(self.a * x, softplus(self.s)))
            pyro.sample("z2", dist.Normal(self.b * z1, softplus(self.t)))
