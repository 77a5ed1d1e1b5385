// tvillingctl.cc: the tvillingctl executable (agent/cli/ctl.h holds the CLI itself).
#include <iostream>

#include "agent/cli/ctl.h"

int main(int argc, char** argv) {
  return tvilling::cli::RunTvillingctl(argc, argv, std::cout, std::cerr);
}
